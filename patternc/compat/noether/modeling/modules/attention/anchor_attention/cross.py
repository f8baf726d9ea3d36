"""``CrossAnchorAttention``: each branch attends to the anchors of the others."""

from __future__ import annotations

from collections.abc import Sequence

from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionPattern,
    CrossAnchorAttentionConfig,
    TokenSpec,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)

__all__ = ["CrossAnchorAttention"]


class CrossAnchorAttention(MultiBranchAnchorAttention):
    """Branch A's tokens attend to the anchors of B, C, ... (at least two branches)."""

    def __init__(self, config: CrossAnchorAttentionConfig) -> None:
        if len(config.branches) < 2:
            raise ValueError("CrossAnchorAttention requires at least two branches.")
        super().__init__(config)

    def _create_attention_patterns(self, token_specs: Sequence[TokenSpec]) -> Sequence[AttentionPattern]:
        return [
            AttentionPattern(
                query_tokens=tuple(self._branch_tokens(token_specs, b)),
                key_value_tokens=tuple(f"{o}{self.anchor_suffix}" for o in self.branches if o != b),
            )
            for b in self.branches
        ]
