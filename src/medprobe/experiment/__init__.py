"""Experiments: the YAML schema, planning and the resumable runner."""
