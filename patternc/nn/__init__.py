"""The torch runtime: attention modules, layers and blocks that execute compiled patterns."""

from patternc.nn.anchor import (
    CrossAnchorAttention,
    JointAnchorAttention,
    MultiBranchAnchorAttention,
    SelfAnchorAttention,
)
from patternc.nn.attention import DotProductAttention, KVCache, MixedAttention, PatternAttention
from patternc.nn.blocks import (
    PerceiverAttention,
    PerceiverBlock,
    TransformerBlock,
    UntiedPerceiverBlock,
    UntiedTransformerBlock,
)
from patternc.nn.chunked import AnchorCache, chunked
from patternc.nn.graphs import graphed
from patternc.nn.layers import MLP, LinearProjection
from patternc.nn.rope import apply_rope, rope_frequencies
from patternc.nn.transformer import Transformer, TransformerLayer, VisionTransformer
from patternc.nn.untied import UntiedLinear, UntiedMixedAttention, UntiedMLP
from patternc.stack_config import (
    AttentionType,
    FfActivation,
    NormKind,
    Pool,
    PosEmbType,
    TransformerConfig,
    VisionTransformerConfig,
)

__all__ = [
    "MLP",
    "AnchorCache",
    "AttentionType",
    "CrossAnchorAttention",
    "DotProductAttention",
    "FfActivation",
    "JointAnchorAttention",
    "KVCache",
    "LinearProjection",
    "MixedAttention",
    "MultiBranchAnchorAttention",
    "NormKind",
    "PatternAttention",
    "PerceiverAttention",
    "PerceiverBlock",
    "Pool",
    "PosEmbType",
    "SelfAnchorAttention",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLayer",
    "UntiedLinear",
    "UntiedMLP",
    "UntiedMixedAttention",
    "UntiedPerceiverBlock",
    "UntiedTransformerBlock",
    "VisionTransformer",
    "VisionTransformerConfig",
    "apply_rope",
    "chunked",
    "graphed",
    "rope_frequencies",
]
