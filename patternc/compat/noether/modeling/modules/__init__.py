"""The peer's modules (``noether.modeling.modules``)."""

from patternc.compat.noether.modeling.modules.activations import Activation
from patternc.compat.noether.modeling.modules.attention import DotProductAttention, PerceiverAttention
from patternc.compat.noether.modeling.modules.blocks import PerceiverBlock, TransformerBlock
from patternc.compat.noether.modeling.modules.layers import (
    LayerScale,
    LinearProjection,
    RopeFrequency,
    UnquantizedDropPath,
)
from patternc.compat.noether.modeling.modules.mlp import MLP, UpActDownMlp

__all__ = [
    "MLP",
    "Activation",
    "DotProductAttention",
    "LayerScale",
    "LinearProjection",
    "PerceiverAttention",
    "PerceiverBlock",
    "RopeFrequency",
    "TransformerBlock",
    "UnquantizedDropPath",
    "UpActDownMlp",
]
