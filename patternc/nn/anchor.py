"""Anchor attention front doors with the seed API: ``SelfAnchorAttention``,
``CrossAnchorAttention``, ``JointAnchorAttention``.

A branch (``surface``) owns the token groups whose ``TokenSpec.domain`` is the
branch (``surface_anchors``, ``surface_queries``); its anchors are the group
``branch + anchor_suffix``. Each class writes its patterns as pattern-language
source for the groups present and compiles it, so the plan it runs is the one
``patternc compile`` prints for that source (:meth:`pattern_source`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor, nn

import patternc
from patternc.configs import (
    AnchorAttentionConfig,
    CrossAnchorAttentionConfig,
    JointAnchorAttentionConfig,
    SelfAnchorAttentionConfig,
)
from patternc.nn.attention import KVCache, MixedAttention
from patternc.nn.traced_layouts import plan_of_source
from patternc.plan import Plan
from patternc.schemas import MixedAttentionConfig, TokenSpec, TokenSpecs, as_token_specs

__all__ = [
    "CrossAnchorAttention",
    "JointAnchorAttention",
    "MultiBranchAnchorAttention",
    "SelfAnchorAttention",
]


@functools.lru_cache(maxsize=256)
def _compile(source: str, name: str) -> Plan:
    return patternc.compile(source).patterns[name]


class MultiBranchAnchorAttention(nn.Module):
    """Base of the anchor-attention modules: one ``MixedAttention`` whose
    parameters all branches share, validation, and ``forward``. Subclasses
    write their rules in :meth:`_rules`."""

    pattern_name = "anchor"

    def __init__(self, config: AnchorAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.branches: list[str] = list(config.branches)
        self.anchor_suffix: str = config.anchor_suffix
        fields = {k: v for k, v in config.model_dump().items() if k not in ("branches", "anchor_suffix")}
        self.mixed_attention = MixedAttention(MixedAttentionConfig(**fields))

    def anchor(self, branch: str) -> str:
        return f"{branch}{self.anchor_suffix}"

    def branch_groups(self, specs: Sequence[TokenSpec], branch: str) -> list[str]:
        return [s.name for s in specs if s.domain == branch]

    def _require_all_branches(self, specs: Sequence[TokenSpec]) -> None:
        names = {s.name for s in specs}
        missing = [b for b in self.branches if not self.branch_groups(specs, b)]
        missing_anchors = [self.anchor(b) for b in self.branches if self.anchor(b) not in names]
        if missing or missing_anchors:
            raise ValueError(
                f"{type(self).__name__} needs every configured branch {self.branches} and its anchors in "
                f"token_specs; missing branches: {missing or 'none'}, missing anchor groups: "
                f"{missing_anchors or 'none'} (token_specs: {[s.name for s in specs]})"
            )

    def _rules(self, specs: Sequence[TokenSpec]) -> list[tuple[list[str], list[str]]]:
        """``(query groups, key/value groups)`` of each rule; subclasses say which."""
        raise TypeError(
            f"{type(self).__name__} builds no patterns: use SelfAnchorAttention, CrossAnchorAttention "
            "or JointAnchorAttention, or subclass it and define _rules"
        )

    def pattern_source(self, token_specs: TokenSpecs) -> str:
        """The pattern-language source of the patterns for these groups; save it
        and run ``patternc compile`` on it to inspect the plan."""
        specs = as_token_specs(token_specs)
        lines = [
            f"# {type(self).__name__}: branches {', '.join(self.branches)}",
            "groups " + " ".join(s.name for s in specs),
            f"pattern {self.pattern_name} {{",
            *(f"    {', '.join(q)} -> {', '.join(kv)}" for q, kv in self._rules(specs)),
            "}",
        ]
        return "\n".join(lines) + "\n"

    def plan(self, token_specs: TokenSpecs) -> Plan:
        """The compiled plan for these groups (cached per group list; inside a
        ``torch.compile`` trace compiled outside it, see
        :mod:`patternc.nn.traced_layouts`)."""
        source = self.pattern_source(token_specs)
        traced = plan_of_source(source, self.pattern_name)
        return traced if traced is not None else _compile(source, self.pattern_name)

    def attend(
        self,
        x: Tensor,
        token_specs: TokenSpecs,
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """``(output, new_kv_cache)`` as :class:`~patternc.nn.MixedAttention`
        returns them: the new cache holds the anchors' K/V; give the anchors
        ``size=None`` and that cache to run queries against them later."""
        specs = as_token_specs(token_specs)
        result: tuple[Tensor, KVCache | None] = self.mixed_attention(
            x, specs, self.plan(specs), key_padding_mask, freqs, kv_cache
        )
        return result

    def forward(
        self,
        x: Tensor,
        token_specs: TokenSpecs,
        freqs: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """The output alone (the seed's call); :meth:`attend` also returns the new KV cache."""
        return self.attend(x, token_specs, key_padding_mask, freqs, kv_cache)[0]


class SelfAnchorAttention(MultiBranchAnchorAttention):
    """Each branch attends to its own anchors: for branches A, B, the tokens of
    A attend to ``A_anchors`` and those of B to ``B_anchors``. Every configured
    branch and its anchors must be present."""

    pattern_name = "self_anchor"

    def __init__(self, config: SelfAnchorAttentionConfig) -> None:
        super().__init__(config)

    def _rules(self, specs: Sequence[TokenSpec]) -> list[tuple[list[str], list[str]]]:
        self._require_all_branches(specs)
        return [(self.branch_groups(specs, b), [self.anchor(b)]) for b in self.branches]


class CrossAnchorAttention(MultiBranchAnchorAttention):
    """Each branch attends to the anchors of all other branches: for A, B, C,
    A attends to ``B_anchors + C_anchors``. Every configured branch and its
    anchors must be present."""

    pattern_name = "cross_anchor"

    def __init__(self, config: CrossAnchorAttentionConfig) -> None:
        super().__init__(config)

    def _rules(self, specs: Sequence[TokenSpec]) -> list[tuple[list[str], list[str]]]:
        self._require_all_branches(specs)
        return [
            (self.branch_groups(specs, b), [self.anchor(o) for o in self.branches if o != b])
            for b in self.branches
        ]


class JointAnchorAttention(MultiBranchAnchorAttention):
    """All tokens attend to the anchors of every configured branch present;
    at least one anchor group must be present."""

    pattern_name = "joint"

    def __init__(self, config: JointAnchorAttentionConfig) -> None:
        super().__init__(config)

    def _rules(self, specs: Sequence[TokenSpec]) -> list[tuple[list[str], list[str]]]:
        names = {s.name for s in specs}
        anchors = [self.anchor(b) for b in self.branches if self.anchor(b) in names]
        if not anchors:
            raise ValueError(
                f"JointAnchorAttention needs at least one anchor group "
                f"({', '.join(self.anchor(b) for b in self.branches)}) in token_specs, got {sorted(names)}"
            )
        return [([s.name for s in specs], anchors)]
