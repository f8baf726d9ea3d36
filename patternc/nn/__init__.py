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
from patternc.nn.layers import MLP, LinearProjection
from patternc.nn.rope import apply_rope, rope_frequencies
from patternc.nn.untied import UntiedLinear, UntiedMixedAttention, UntiedMLP

__all__ = [
    "MLP",
    "CrossAnchorAttention",
    "DotProductAttention",
    "JointAnchorAttention",
    "KVCache",
    "LinearProjection",
    "MixedAttention",
    "MultiBranchAnchorAttention",
    "PatternAttention",
    "PerceiverAttention",
    "PerceiverBlock",
    "SelfAnchorAttention",
    "TransformerBlock",
    "UntiedLinear",
    "UntiedMLP",
    "UntiedMixedAttention",
    "UntiedPerceiverBlock",
    "UntiedTransformerBlock",
    "apply_rope",
    "rope_frequencies",
]
