"""The runtime's entry to the compiler: token specs and patterns -> :class:`Layout`.

``MixedAttention`` takes a compiled :class:`~patternc.Plan` or a hand-written
``AttentionPattern`` list. Both end as the plan's
:class:`~patternc.lower.layout.Layout` at these sizes, which executors read as it
is. Hand-written lists are checked once per (groups, patterns) and cached in
:data:`patternc.plan.CHECKED_PATTERNS`; layouts in :data:`patternc.plan.LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Sequence

from patternc.lower.layout import Call, Layout, Segment
from patternc.nn.traced_layouts import layout_of, layout_of_patterns
from patternc.plan import Plan, plan_for_patterns
from patternc.schemas import AttentionPattern, TokenSpec

__all__ = ["Call", "Layout", "Segment", "plan_for_patterns", "schedule_for"]


def schedule_for(token_specs: Sequence[TokenSpec], patterns: Plan | Sequence[AttentionPattern]) -> Layout:
    """The layout of a plan or a hand-written pattern list at these sizes."""
    specs = tuple(token_specs)
    if isinstance(patterns, Plan):
        return layout_of(patterns, specs)
    traced = layout_of_patterns(specs, patterns)
    return traced if traced is not None else plan_for_patterns(specs, patterns).layout(specs)
