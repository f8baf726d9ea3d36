"""``SelfAnchorAttention``: each branch attends to its own anchors."""

from __future__ import annotations

from collections.abc import Sequence

from patternc.compat.noether.core.schemas.modules.attention import AttentionPattern, TokenSpec
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)

__all__ = ["SelfAnchorAttention"]


class SelfAnchorAttention(MultiBranchAnchorAttention):
    """Branch A's tokens attend to ``A_anchors``, B's to ``B_anchors``, ..."""

    def _create_attention_patterns(self, token_specs: Sequence[TokenSpec]) -> Sequence[AttentionPattern]:
        return [
            AttentionPattern(
                query_tokens=tuple(self._branch_tokens(token_specs, b)),
                key_value_tokens=(f"{b}{self.anchor_suffix}",),
            )
            for b in self.branches
        ]
