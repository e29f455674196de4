"""Report generation from a frozen image encoder (RAD-DINO's LLaVA-style evaluation).

Importing the package registers the ``report_generation`` protocol.
"""
from medprobe.protocols.report_generation import protocol  # noqa: F401  (registers the protocol)
