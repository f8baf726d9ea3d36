"""The runtime's entry to the compiler: token specs and patterns -> :class:`Layout`.

``MixedAttention`` takes a compiled :class:`~patternc.Plan` or a hand-written
``AttentionPattern`` list. Both end as the plan's
:class:`~patternc.layout.Layout` at these sizes, which executors read as it
is. Hand-written lists are checked once per (groups, patterns) and cached in
:data:`patternc.cache.CHECKED_PATTERNS`; layouts in :data:`patternc.cache.LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Sequence

from patternc.cache import CHECKED_PATTERNS
from patternc.checks import check_patterns
from patternc.ir import KeyGroup, ResolvedRule
from patternc.layout import Call, Layout, Segment
from patternc.nn.traced_layouts import layout_of, layout_of_patterns
from patternc.plan import Plan
from patternc.schemas import AttentionPattern, TokenSpec

__all__ = ["Call", "Layout", "Segment", "plan_for_patterns", "schedule_for"]


def plan_for_patterns(specs: Sequence[TokenSpec], patterns: Sequence[AttentionPattern]) -> Plan:
    """A checked plan of a hand-written list (sizes do not matter, only which groups are cached)."""
    groups = tuple((s.name, s.size is None) for s in specs)
    key = (groups, tuple(patterns))

    def build() -> Plan:
        check_patterns([TokenSpec(name=n, size=None if c else 0) for n, c in groups], patterns)
        rules = tuple(
            ResolvedRule(tuple(p.query_tokens), tuple(KeyGroup(k) for k in p.key_value_tokens))
            for p in patterns
        )
        return Plan("attention_patterns", tuple(name for name, _ in groups), rules)

    return CHECKED_PATTERNS.get_or_build(key, build)


def schedule_for(token_specs: Sequence[TokenSpec], patterns: Plan | Sequence[AttentionPattern]) -> Layout:
    """The layout of a plan or a hand-written pattern list at these sizes."""
    specs = tuple(token_specs)
    if isinstance(patterns, Plan):
        return layout_of(patterns, specs)
    traced = layout_of_patterns(specs, patterns)
    return traced if traced is not None else plan_for_patterns(specs, patterns).layout(specs)
