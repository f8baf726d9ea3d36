"""Schedules: a plan's layout in tensor-index terms, built once per layout.

An executor must not do string work per call. A :class:`Schedule` turns a
:class:`~patternc.plan.Layout` into plain integer ranges: which slices of the
input (or which cached groups) each attention call reads, which launches stack
equal-shaped calls, and how the call outputs are put back in input order.
Schedules are cached per (patterns, sizes), so the hot path only indexes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from patternc.checks import check_patterns
from patternc.modifiers import NO_MODIFIERS, Modifiers
from patternc.plan import Layout, Plan
from patternc.resolve import ResolvedRule
from patternc.schemas import AttentionPattern, TokenSpec

__all__ = ["CallSchedule", "Schedule", "Segment", "schedule_for"]


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, stop)`` of the input (``cached`` None) or of a cached group."""

    start: int
    stop: int
    cached: str | None = None

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class CallSchedule:
    """One attention call: its query segments (input only) and key/value segments."""

    queries: tuple[Segment, ...]
    keys_values: tuple[Segment, ...]
    n_queries: int
    modifiers: Modifiers = NO_MODIFIERS
    single_groups: bool = False
    """One query group and one key/value group: positions within groups are
    plain ``arange``s, so ``[causal]`` is SDPA's ``is_causal``."""


@dataclass(frozen=True, slots=True, eq=False)
class Schedule:
    """Everything an executor needs, as integers.

    Compared and hashed by identity: schedules are cached per layout, and the
    executors' own caches (block masks) key on them on every call, where
    hashing the group tables would cost more than the lookup saves."""

    n_tokens: int
    calls: tuple[CallSchedule, ...]
    launches: tuple[tuple[int, ...], ...]
    """Calls of equal ``(Nq, Nkv)``, each tuple one stacked launch."""
    output_order: tuple[tuple[int, int, int], ...]
    """``(call, start, stop)`` within that call's output, in input order."""
    input_groups: tuple[str, ...]
    """Groups in ``x``, in input order (empty ones included)."""
    group_ids: tuple[int, ...]
    """Index into ``all_groups`` of every input group, in input order."""
    all_groups: tuple[str, ...]
    input_sizes: tuple[int, ...]
    cached_groups: tuple[str, ...]
    """Cached groups some call reads, in group order."""
    key_value_groups: tuple[str, ...]
    """Input groups other patterns can reuse from a KV cache (groups used as keys/values)."""
    allowed: tuple[tuple[bool, ...], ...]
    """``allowed[q][k]``: group ``q`` attends to group ``k`` (indices into ``all_groups``)."""
    group_modifiers: tuple[Modifiers, ...] = ()
    """Modifiers of the rule each group is a query in (indexed like ``all_groups``)."""
    has_modifiers: bool = False
    """Some group's rule has modifiers (read on every call: stored, not recomputed)."""


def _schedule_from_layout(plan: Plan, layout: Layout) -> Schedule:
    slots = {s.name: s for s in layout.slots}

    def segments(names: Sequence[str]) -> tuple[Segment, ...]:
        out = []
        for name in names:
            slot = slots[name]
            if slot.cached:
                out.append(Segment(0, -1, name))  # length known at run time
            elif slot.size:
                out.append(Segment(slot.offset, slot.offset + slot.size))
        merged: list[Segment] = []
        for seg in sorted((s for s in out if s.cached is None), key=lambda s: s.start):
            if merged and merged[-1].stop == seg.start:
                merged[-1] = Segment(merged[-1].start, seg.stop)
            else:
                merged.append(seg)
        return (*merged, *(s for s in out if s.cached is not None))

    calls = tuple(
        CallSchedule(
            segments(c.query_tokens),
            segments(c.key_value_tokens),
            c.n_queries,
            c.modifiers,
            single_groups=sum(1 for g in c.query_tokens if slots[g].size) == 1
            and sum(1 for g in c.key_value_tokens if slots[g].size or slots[g].cached) == 1,
        )
        for c in layout.calls
    )
    # Where each input group's outputs live: (call, offset within the call's queries).
    pieces: list[tuple[int, int, int, int]] = []  # (input start, call, start, stop)
    for call_index, call in enumerate(calls):
        offset = 0
        for seg in call.queries:
            pieces.append((seg.start, call_index, offset, offset + seg.length))
            offset += seg.length
    pieces.sort()
    order = [p[1:] for p in pieces]
    inputs = [s for s in layout.slots if not s.cached]
    index = {g: i for i, g in enumerate(plan.groups)}
    allowed = [[False] * len(plan.groups) for _ in plan.groups]
    group_modifiers = [Modifiers()] * len(plan.groups)
    for pattern, modifiers in plan.calls:
        for q in pattern.query_tokens:
            group_modifiers[index[q]] = modifiers
            for k in pattern.key_value_tokens:
                allowed[index[q]][index[k]] = True
    used_as_keys = {k for p in plan.patterns for k in p.key_value_tokens}
    cached = tuple(
        g
        for g in plan.groups
        if slots[g].cached and any(g in c.key_value_tokens and c.n_queries for c in layout.calls)
    )
    return Schedule(
        n_tokens=layout.n_tokens,
        calls=calls,
        launches=layout.launches,
        output_order=tuple(order),
        input_groups=tuple(s.name for s in inputs),
        group_ids=tuple(index[s.name] for s in inputs),
        all_groups=plan.groups,
        input_sizes=tuple(s.size or 0 for s in inputs),
        cached_groups=cached,
        key_value_groups=tuple(s.name for s in inputs if s.name in used_as_keys),
        allowed=tuple(tuple(row) for row in allowed),
        group_modifiers=tuple(group_modifiers),
        has_modifiers=any(group_modifiers),
    )


@functools.lru_cache(maxsize=512)
def _plan_for_patterns(groups: tuple[tuple[str, bool], ...], patterns: tuple[AttentionPattern, ...]) -> Plan:
    """Checked once per (group names, which are cached, patterns): sizes do not matter."""
    specs = [TokenSpec(name=name, size=None if cached else 0) for name, cached in groups]
    check_patterns(specs, patterns)
    rules = tuple(ResolvedRule(tuple(p.query_tokens), tuple(p.key_value_tokens)) for p in patterns)
    return Plan("attention_patterns", tuple(name for name, _ in groups), rules)


@functools.lru_cache(maxsize=512)
def _schedule_for_plan(plan: Plan, specs: tuple[TokenSpec, ...]) -> Schedule:
    plan = plan.bind([s.name for s in specs])  # families -> this input's groups
    if tuple(s.name for s in specs) != plan.groups:
        # A plan's groups must come in the plan's order; a reordered input would
        # silently attend the wrong tokens.
        from patternc.diagnostics import Code, Diagnostic, PatternError

        raise PatternError(
            [
                Diagnostic(
                    Code.NOT_EXHAUSTIVE,
                    f"token_specs name {[s.name for s in specs]} but the plan's groups are "
                    f"{list(plan.groups)} (in this order)",
                    where="token_specs",
                    hint="build token_specs with plan.token_specs(sizes)",
                )
            ]
        )
    return _schedule_from_layout(plan, plan.layout(specs))


def schedule_for(token_specs: Sequence[TokenSpec], patterns: Plan | Sequence[AttentionPattern]) -> Schedule:
    """The schedule of a plan or a hand-written pattern list at these sizes.

    Hand-written lists are checked (``patternc.check_patterns``) the first time
    they are seen; both checks and schedules are cached.
    """
    specs = tuple(token_specs)
    if isinstance(patterns, Plan):
        return _schedule_for_plan(patterns, specs)
    plan = _plan_for_patterns(tuple((s.name, s.size is None) for s in specs), tuple(patterns))
    return _schedule_for_plan(plan, specs)
