"""Segmentation on frozen foundation features: decoders, scratch baselines, 2D and 3D.

Importing this package registers the ``segmentation`` protocol (see :mod:`.protocol`).
"""
from medprobe.protocols.base import register_protocol
from medprobe.protocols.segmentation.protocol import Segmentation, SegmentationOptions

register_protocol(Segmentation)

__all__ = ["Segmentation", "SegmentationOptions"]
