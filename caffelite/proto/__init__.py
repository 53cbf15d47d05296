"""Caffe-compatible protobuf messages.

``caffelite.proto.pb`` is the generated module (``caffelite_pb2``); its
messages are wire- and text-format compatible with BVLC Caffe's caffe.proto.
Regenerate it with ``scripts/regen_proto.sh`` after editing caffelite.proto.
"""

from . import caffelite_pb2
from . import caffelite_pb2 as pb

__all__ = ["pb", "caffelite_pb2"]
