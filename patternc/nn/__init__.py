"""The torch runtime: attention modules that execute compiled patterns."""

from patternc.nn.attention import DotProductAttention, KVCache, MixedAttention, PatternAttention
from patternc.nn.rope import apply_rope, rope_frequencies

__all__ = [
    "DotProductAttention",
    "KVCache",
    "MixedAttention",
    "PatternAttention",
    "apply_rope",
    "rope_frequencies",
]
