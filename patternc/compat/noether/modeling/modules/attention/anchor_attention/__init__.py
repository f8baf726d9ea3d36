"""The peer's anchor attention (``noether.modeling.modules.attention.anchor_attention``)."""

from patternc.compat.noether.modeling.modules.attention.anchor_attention.cross import CrossAnchorAttention
from patternc.compat.noether.modeling.modules.attention.anchor_attention.joint import JointAnchorAttention
from patternc.compat.noether.modeling.modules.attention.anchor_attention.mixed import MixedAttention
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention.self_anchor import (
    SelfAnchorAttention,
)

__all__ = [
    "CrossAnchorAttention",
    "JointAnchorAttention",
    "MixedAttention",
    "MultiBranchAnchorAttention",
    "SelfAnchorAttention",
]
