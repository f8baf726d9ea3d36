"""The compile boundary: where a ``torch.compile`` trace crosses into
patternc's records, and the one module that asks whether code is traced.

A layer's entry point asks here once per call (:func:`layout_of` and the
functions beside it; :func:`in_trace` for a layer that needs the answer
before it has a layout) and hands the answer down: a traced call gets a
layout whose tables slot is a trace's view
(:class:`~patternc.lower.tables.TracedTables`, ``layout.tables.traced``),
which executors, their tables and ``auto`` read instead of asking torch;
caches a layer reads are told not to store (``store=False``). Nothing
below this module asks whether it runs in a trace.

Eager calls look their layout up in :data:`patternc.plan.LAYOUTS`, and a
trace after one eager call finds it there too. A *cold* trace (a model
compiled before it ever ran) must build it, and Dynamo before torch 2.13
cannot trace the compiler (it fails on its frozen records, e.g. "can't
wrap ``Modifiers``"). So :func:`layout_of` builds the layout outside the
trace, as plain Python in a function Dynamo runs once and holds as a
constant, and the graph reads the result from :data:`TRACED_RECORDS`.

The seed API's calls needed the same in every trace, warm or cold, on
torch 2.11 and 2.13 alike: a hand-written pattern list is checked through a
cache keyed by its frozen pydantic patterns, whose hash Dynamo cannot
follow (:func:`layout_of_patterns`); ``{name: size}`` dicts become
``TokenSpec`` through pydantic's compiled validator
(:func:`token_specs_of`); the anchor modules compile pattern source per
call, and the parser calls ``re.finditer`` (:func:`plan_of_source`).

A layout a trace reads is a copy of the one :data:`~patternc.plan.LAYOUTS`
holds, made once per layout and held by its tables apart from the tables
themselves (no bound evicts it), so that every graph traced against it
guards on the same object.

Two things shape this:
- Dynamo hands such a function constants only: neither a plan nor a module
  converts on torch 2.11, so the plan travels by ``id``, and the function
  finds it in :data:`~patternc.plan.PLANS_BY_ID`, where every plan made
  outside a trace enters itself (a layer's, one from ``patternc.compile``,
  one handed to ``MixedAttention`` per call).
- The built layout reaches the graph as an attribute of one object, one
  attribute per layout. A dict entry added by the function would be missed
  by a trace that read the dict earlier (Dynamo reads a dict once per
  trace), as a second layer with another plan does; and a layout returned
  as the constant itself reaches the graph as an opaque attribute whose
  fields Dynamo 2.11 cannot read.

>>> import patternc, torch
>>> from patternc.nn import PatternAttention
>>> plan = patternc.compile("groups a q\\na -> a\\nq -> a").patterns["default"]
>>> layer = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
>>> compiled = torch.compile(layer, fullgraph=True, backend="eager")  # before any eager call
>>> out, _ = compiled(torch.randn(1, 5, 8), {"a": 2, "q": 3})
>>> out.shape
torch.Size([1, 5, 8])
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar, cast

import torch

from patternc.lower.layout import Layout
from patternc.lower.tables import TracedTables
from patternc.plan import PLANS_BY_ID, Plan, Sizes, plan_for_patterns, sizes_key
from patternc.schemas import AttentionPattern, TokenSpec, TokenSpecs, as_token_specs
from patternc.tracing import compiling as _compiling

__all__ = [
    "TRACED_RECORDS",
    "in_trace",
    "layout_of",
    "layout_of_patterns",
    "plan_for_rows",
    "plan_of_source",
    "token_specs_of",
]

SizesKey = tuple[tuple[str, int | None], ...]
RulesKey = tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
"""A hand-written pattern list as constants: ``(query_tokens, key_value_tokens)`` each."""


class TracedRecords:
    """Compiler records built for traces, each an attribute of this object
    that a graph reads (and Dynamo guards). Key: what a record is built from
    (``("layout", plan, sizes key, sizes given as a mapping)``,
    ``("patterns", sizes key, rules)``, ``("source", source, pattern)``,
    ``("specs", sizes key)``) -> the attribute's name. Every ask stores the
    record it is given anew: for a layout, the one
    :data:`~patternc.plan.LAYOUTS` holds now, whose tables and picks eager
    calls stored (a graph traced against a record since replaced fails its
    guard and is traced again). Not bounded: an entry is made per trace
    that builds a record, which costs far more than the entry."""

    def __init__(self) -> None:
        self._names: dict[Hashable, str] = {}

    def hold(self, key: Hashable, record: object) -> str:
        """The attribute for ``key`` (made on the first ask), now holding ``record``."""
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"record_{len(self._names)}"
        setattr(self, name, record)
        return name


TRACED_RECORDS = TracedRecords()

_F = TypeVar("_F", bound=Callable[..., object])


def _as_constant(build: _F) -> _F:
    """``build`` as a function Dynamo runs once as plain Python inside a
    trace, its result a constant of the graph."""
    return cast(_F, torch.compiler.assume_constant_result(build))  # type: ignore[no-untyped-call,unused-ignore]


def _static_sizes_key(sizes: Sizes) -> SizesKey:
    """:func:`~patternc.plan.sizes_key` with every size a Python ``int``.
    Dynamo treats an int argument that changed between calls as dynamic (a
    ``SymInt``), and a constant function takes constants only.
    ``operator.index`` specialises each size (``int()`` keeps it symbolic),
    so a new sizes dict is one recompile guarded on its values, as a layout
    (split sizes, offsets) is specific to them."""
    return tuple((name, None if size is None else operator.index(size)) for name, size in sizes_key(sizes))


def _token_specs(key: SizesKey) -> list[TokenSpec]:
    return [TokenSpec(name=name, size=size) for name, size in key]


def in_trace() -> bool:
    """Whether the caller runs inside a ``torch.compile`` trace: for a
    layer's entry point that needs the answer before it has a layout (a
    ``Transformer`` reads its positions and context first). Ask once per
    call and hand the answer down."""
    return _compiling()


def for_trace(layout: Layout) -> Layout:
    """The copy of ``layout`` a trace reads: the same records, its tables a
    :class:`~patternc.lower.tables.TracedTables` view of ``layout``'s. Made
    once per layout and held by its tables (:meth:`Tables.view
    <patternc.lower.tables.Tables.view>`), so graphs guard on one object."""

    def make() -> Layout:
        view = dataclasses.replace(layout)
        object.__setattr__(view, "tables", TracedTables(layout.tables, layout))
        return view

    return layout.tables.view(make)


def _kept_layout(plan: Plan, sizes: Sizes) -> Layout:
    """``plan.layout(sizes)`` (kept in :data:`~patternc.plan.LAYOUTS`, where
    eager calls find it and the tables made for it), as a trace reads it."""
    return for_trace(plan.layout(sizes))


def _known_plan(plan_id: int) -> Plan:
    """The plan a trace names by ``id``. Every plan enters
    :data:`~patternc.plan.PLANS_BY_ID` when made, and patternc makes none
    inside a trace (bound and per-row plans are made here, outside it); a
    plan a user's compiled function makes itself is not found."""
    plan = PLANS_BY_ID.get(plan_id)
    if plan is None:
        raise ValueError(
            "a plan made inside a torch.compile'd function cannot be laid out there; "
            "make the plan (patternc.compile, Plan(...)) outside the compiled function"
        )
    return plan


def _build_for_trace(plan_id: int, key: SizesKey, mapping: bool) -> str:
    """Plain Python inside a trace: the slot of the plan's layout at these
    sizes. A layout that fails to build raises here, and Dynamo's error
    carries the compiler's diagnostics."""
    plan = _known_plan(plan_id)
    sizes: Sizes = dict(key) if mapping else _token_specs(key)
    return TRACED_RECORDS.hold(("layout", plan, key, mapping), _kept_layout(plan, sizes))


_built_for_trace = _as_constant(_build_for_trace)


def layout_of(plan: Plan, sizes: Sizes) -> Layout:
    """``plan.layout(sizes)``; inside a ``torch.compile`` trace the same
    layout built outside the trace, as a trace reads it (see the module
    docstring)."""
    if _compiling():
        name = _built_for_trace(id(plan), _static_sizes_key(sizes), isinstance(sizes, Mapping))
        layout: Layout = getattr(TRACED_RECORDS, name)
        return layout
    return plan.layout(sizes)


def _rows_for_trace(plan_id: int, rows: tuple[tuple[str, ...], ...]) -> str:
    """Plain Python inside a trace: the slot of the plan stacked per row."""
    plan = _known_plan(plan_id)
    return TRACED_RECORDS.hold(("rows", plan, rows), plan.per_row(rows))


_rows_built_for_trace = _as_constant(_rows_for_trace)


def plan_for_rows(plan: Plan, rows: Sequence[Sequence[str]]) -> Plan:
    """``plan.per_row(rows)``; inside a trace made outside it (a plan is
    never made in a trace, see :func:`_known_plan`)."""
    if _compiling():
        key = tuple(tuple(names) for names in rows)
        stacked: Plan = getattr(TRACED_RECORDS, _rows_built_for_trace(id(plan), key))
        return stacked
    return plan.per_row(rows)


def _build_for_patterns(specs: SizesKey, rules: RulesKey) -> str:
    """Plain Python inside a trace: the slot of a hand-written list's layout
    at these sizes (the list checked and its plan built as eagerly)."""
    token_specs = _token_specs(specs)
    patterns = [AttentionPattern(query_tokens=q, key_value_tokens=kv) for q, kv in rules]
    layout = _kept_layout(plan_for_patterns(token_specs, patterns), token_specs)
    return TRACED_RECORDS.hold(("patterns", specs, rules), layout)


_built_for_patterns = _as_constant(_build_for_patterns)


def layout_of_patterns(specs: Sequence[TokenSpec], patterns: Sequence[AttentionPattern]) -> Layout | None:
    """Inside a ``torch.compile`` trace, the layout of a hand-written list
    (the seed API's ``MixedAttention(x, token_specs, patterns)``), built
    outside the trace from the list's fields; None outside a trace. Dynamo
    cannot trace the check's cache either: its key holds the patterns,
    frozen pydantic models whose hash it cannot follow (torch 2.11 and
    2.13 alike)."""
    if not _compiling():
        return None
    rules = tuple((tuple(p.query_tokens), tuple(p.key_value_tokens)) for p in patterns)
    name = _built_for_patterns(_static_sizes_key(specs), rules)
    layout: Layout = getattr(TRACED_RECORDS, name)
    return layout


def _compile_for_trace(source: str, pattern: str) -> str:
    """Plain Python inside a trace: the slot of the plan ``source`` compiles
    to (made here, outside the trace, it enters ``PLANS_BY_ID``, so its
    layouts are built outside the trace too)."""
    import patternc

    plan = patternc.compile(source).patterns[pattern]
    return TRACED_RECORDS.hold(("source", source, pattern), plan)


_compiled_for_trace = _as_constant(_compile_for_trace)


def plan_of_source(source: str, pattern: str) -> Plan | None:
    """Inside a ``torch.compile`` trace, the plan of pattern ``pattern`` in
    ``source``, compiled outside the trace (the compiler's parser is Python
    Dynamo cannot trace: ``re.finditer``); None outside a trace."""
    if not _compiling():
        return None
    plan: Plan = getattr(TRACED_RECORDS, _compiled_for_trace(source, pattern))
    return plan


def _specs_for_trace(key: SizesKey) -> str:
    """Plain Python inside a trace: the slot of these groups' ``TokenSpec`` list."""
    return TRACED_RECORDS.hold(("specs", key), _token_specs(key))


_specs_built_for_trace = _as_constant(_specs_for_trace)


def token_specs_of(token_specs: TokenSpecs) -> list[TokenSpec]:
    """:func:`~patternc.schemas.as_token_specs`, also inside a ``torch.compile``
    trace: there ``{name: size}`` dicts become ``TokenSpec`` outside the trace
    (pydantic's validator is compiled code Dynamo cannot trace)."""
    if not _compiling() or all(isinstance(spec, TokenSpec) for spec in token_specs):
        return as_token_specs(token_specs)
    pairs: list[tuple[str, int | None]] = []
    for spec in [token_specs] if isinstance(token_specs, Mapping) else token_specs:
        pairs.extend(spec.items() if isinstance(spec, Mapping) else [(spec.name, spec.size)])
    specs: list[TokenSpec] = getattr(TRACED_RECORDS, _specs_built_for_trace(tuple(pairs)))
    return specs
