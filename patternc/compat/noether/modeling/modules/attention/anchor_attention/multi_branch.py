"""``MultiBranchAnchorAttention``, the peer's base of the anchor modules
(``noether.modeling.modules.attention.anchor_attention.multi_branch``).

A branch's tokens are the groups whose name *starts with* the branch name
(the peer's rule); its anchors are the group ``branch + anchor_suffix``.
Subclasses write the patterns for a list of groups; the shared
:class:`MixedAttention` (``mixed_attention``) checks and runs them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionConfig,
    AttentionPattern,
    MixedAttentionConfig,
    MultiBranchAnchorAttentionConfig,
    TokenSpec,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention.mixed import (
    KVCache,
    MixedAttention,
    as_specs,
)

__all__ = [
    "MissingAnchorTokenError",
    "MissingBranchTokensError",
    "MultiBranchAnchorAttention",
    "UnexpectedTokenError",
]


class MissingBranchTokensError(ValueError):
    """A configured branch has no tokens in ``token_specs``."""


class MissingAnchorTokenError(ValueError):
    """A configured branch has no anchor group in ``token_specs``."""


class UnexpectedTokenError(ValueError):
    """A group of ``token_specs`` belongs to no configured branch."""


class MultiBranchAnchorAttention(nn.Module, metaclass=abc.ABCMeta):
    """Anchor attention whose branches share one set of projections
    (``mixed_attention``). ``forward(x, token_specs, key_padding_mask=None,
    freqs=None, kv_cache=None)`` returns ``(out, new_kv_cache)`` as
    :class:`MixedAttention` does."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        branched = MultiBranchAnchorAttentionConfig(**config.model_dump())
        if not branched.branches:
            raise ValueError("The 'branches' list cannot be empty.")
        extra = {k: v for k, v in (branched.model_extra or {}).items() if k == "implementation"}
        self.mixed_attention: nn.Module = MixedAttention(
            MixedAttentionConfig(
                hidden_dim=branched.hidden_dim,
                num_heads=branched.num_heads,
                use_rope=branched.use_rope,
                bias=branched.bias,
                init_weights=branched.init_weights,
                dropout=branched.dropout,
                **extra,
            )
        )
        self.branches = branched.branches
        self.anchor_suffix = branched.anchor_suffix
        self._patterns: dict[tuple[str, ...], list[AttentionPattern]] = {}

    def forward(
        self,
        x: Tensor,
        token_specs: Sequence[TokenSpec] | Any,
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Any:
        specs = as_specs(token_specs)
        names = tuple(s.name for s in specs)
        patterns = self._patterns.get(names)
        if patterns is None:
            self._validate(specs)
            patterns = list(self._create_attention_patterns(specs))
            self._patterns[names] = patterns
        return self.mixed_attention(
            x, specs, patterns, key_padding_mask=key_padding_mask, freqs=freqs, kv_cache=kv_cache
        )

    @abc.abstractmethod
    def _create_attention_patterns(self, token_specs: Sequence[TokenSpec]) -> Sequence[AttentionPattern]:
        """The patterns for these groups."""

    def _branch_tokens(self, token_specs: Sequence[TokenSpec], branch: str) -> list[str]:
        return [s.name for s in token_specs if s.name.startswith(branch)]

    def _validate(self, token_specs: Sequence[TokenSpec]) -> None:
        """Every group belongs to a branch; every branch has tokens and its anchor group."""
        names = {s.name for s in token_specs}
        for spec in token_specs:
            if not any(spec.name.startswith(b) for b in self.branches):
                raise UnexpectedTokenError(
                    f"Unexpected token in input: Token '{spec.name}' "
                    "does not belong to any configured branch. "
                    f"Configured branches: {list(self.branches)}"
                )
        for branch in self.branches:
            if not self._branch_tokens(token_specs, branch):
                raise MissingBranchTokensError(
                    f"Configured branch '{branch}' has no tokens present in the input `token_specs`."
                )
            anchor = f"{branch}{self.anchor_suffix}"
            if anchor not in names:
                raise MissingAnchorTokenError(
                    f"Configured branch '{branch}' is missing its required anchor token '{anchor}'."
                )
