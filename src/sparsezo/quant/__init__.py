"""4-bit frozen base: the layer kinds (:mod:`.layers`, the registry), and quantizing, saving and
loading models and folders around a mask (:mod:`.convert`)."""

from .int4 import Int4Linear
from .layers import QUANT_LAYERS, QUANT_TYPES, layer_bytes, new_layer
from .nf4 import NF4Linear

__all__ = ["Int4Linear", "NF4Linear", "QUANT_LAYERS", "QUANT_TYPES", "layer_bytes", "new_layer"]
