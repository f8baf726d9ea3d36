"""``JointAnchorAttention``: every token attends to the anchors of every branch."""

from __future__ import annotations

from collections.abc import Sequence

from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionPattern,
    JointAnchorAttentionConfig,
    TokenSpec,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)

__all__ = ["JointAnchorAttention"]


class JointAnchorAttention(MultiBranchAnchorAttention):
    """All groups attend to all branches' anchors (at least two branches, as in
    the peer; for one, use ``SelfAnchorAttention``)."""

    def __init__(self, config: JointAnchorAttentionConfig) -> None:
        if len(config.branches) < 2:
            raise ValueError(
                "JointAnchorAttention requires at least two branches. Otherwise use SelfAnchorAttention."
            )
        super().__init__(config)

    def _create_attention_patterns(self, token_specs: Sequence[TokenSpec]) -> Sequence[AttentionPattern]:
        anchors = [f"{b}{self.anchor_suffix}" for b in self.branches]
        return [
            AttentionPattern(query_tokens=tuple(s.name for s in token_specs), key_value_tokens=tuple(anchors))
        ]
