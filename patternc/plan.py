"""Plans: one checked pattern, as data.

A :class:`Plan` holds a pattern's groups and resolved rules, and the
attention calls the compiler merged them into (:class:`~patternc.ir.AttentionCall`:
rules with the same keys and per-key modifiers share one call). A plan at
concrete sizes is lowered by :mod:`patternc.lower` (binding families to
run-time groups, then the :class:`~patternc.lower.layout.Layout` every
executor reads); :meth:`Plan.layout` asks for it through the one layout
cache, :data:`LAYOUTS`. Exports (JSON, Graphviz) live in :mod:`patternc.export`.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from patternc.checks import check_patterns
from patternc.diagnostics import Code, Diagnostic, PatternError, suggest
from patternc.ir import AttentionCall, KeyGroup, Keys, ResolvedRule
from patternc.lower.bind import Bound, bind
from patternc.lower.cache import BoundedCache
from patternc.lower.layout import Layout, ShardSizes, Sizes, build_layout, normalize_sizes
from patternc.lower.rows import check_row, in_row, stack_rows
from patternc.members import is_family, type_stem
from patternc.schemas import AttentionPattern, TokenSpec, domain_of

if TYPE_CHECKING:
    import networkx

__all__ = [
    "BINDINGS",
    "CHECKED_PATTERNS",
    "LAYOUTS",
    "PLANS_BY_ID",
    "ROWS",
    "Plan",
    "Program",
    "Sizes",
    "layout_weight",
    "merge_calls",
    "names_of",
    "plan_for_patterns",
    "sizes_key",
]


def merge_calls(groups: Sequence[str], rules: Sequence[ResolvedRule]) -> tuple[AttentionCall, ...]:
    """Rules with the same keys (names and modifiers) merged into one call, in
    order of each call's first rule; query groups in group order."""
    merged: dict[Sequence[KeyGroup], set[str]] = {}
    for rule in rules:
        merged.setdefault(rule.keys, set()).update(rule.queries)
    index = {g: i for i, g in enumerate(groups)}
    return tuple(AttentionCall(tuple(sorted(q, key=index.__getitem__)), keys) for keys, q in merged.items())


@dataclass(frozen=True)
class Plan:
    """One checked attention pattern.

    >>> import patternc
    >>> plan = patternc.compile("groups a b\\na, b -> a").patterns["default"]
    >>> plan.attention_patterns[0].query_tokens
    ('a', 'b')
    """

    name: str
    groups: tuple[str, ...]
    rules: tuple[ResolvedRule, ...]
    group_types: tuple[str, ...] = ()
    """Token type (weight bank) of each group, aligned with ``groups``; empty
    means every group's type is its ``TokenSpec.domain``."""
    calls: tuple[AttentionCall, ...] = field(init=False, compare=False, repr=False)
    """The attention calls (built from ``rules`` when the plan is made)."""
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calls", merge_calls(self.groups, self.rules))
        # structural, as equality is, but computed once: plans key the
        # layout cache on every forward call
        object.__setattr__(self, "_hash", hash((self.name, self.groups, self.rules, self.group_types)))
        PLANS_BY_ID[id(self)] = self

    def __repr__(self) -> str:
        # the rules as written (a bound ``-> self`` rule repeats per member)
        written = list(dict.fromkeys(r.text for r in self.rules if r.text))
        texts = written or [c.text() for c in self.calls]
        rules = "; ".join(texts[:6])
        more = f"; ... {len(texts) - 6} more" if len(texts) > 6 else ""
        return f"Plan({self.name!r}: {rules}{more})"

    def __reduce__(self) -> tuple[type[Plan], tuple[object, ...]]:
        """Copied and unpickled through ``__init__``: the hash is of this
        process (a string's hash differs between processes), and the copy
        enters :data:`PLANS_BY_ID`."""
        return (Plan, (self.name, self.groups, self.rules, self.group_types))

    def __hash__(self) -> int:
        return self._hash

    @property
    def types(self) -> dict[str, str]:
        """``{group: type}``: the weight bank untied layers use for each group."""
        if self.group_types:
            return dict(zip(self.groups, self.group_types))
        return {g: domain_of(type_stem(g)) for g in self.groups}

    @property
    def type_names(self) -> tuple[str, ...]:
        """Distinct types in order of first appearance among the groups."""
        return tuple(dict.fromkeys(self.types.values()))

    @property
    def patterns(self) -> tuple[AttentionPattern, ...]:
        """The calls' patterns, modifiers aside (see :attr:`attention_patterns`)."""
        return tuple(
            AttentionPattern(query_tokens=c.queries, key_value_tokens=c.key_names) for c in self.calls
        )

    @property
    def has_modifiers(self) -> bool:
        return any(c.has_modifiers for c in self.calls)

    @property
    def attention_patterns(self) -> list[AttentionPattern]:
        """The seed-style pattern list ``MixedAttention`` takes.

        The seed's ``AttentionPattern`` has no modifiers, so a plan with
        modifiers raises instead of dropping them: pass the plan itself to
        ``MixedAttention`` (it accepts a :class:`Plan` wherever it takes a list).
        """
        if self.has_modifiers:
            modified = next(c for c in self.calls if c.has_modifiers)
            raise ValueError(
                f"pattern `{self.name}` has modifiers (`{modified.text()}`) that the seed's "
                "AttentionPattern cannot carry; pass the plan itself (MixedAttention(...)(x, specs, plan)) "
                "instead of plan.attention_patterns"
            )
        return list(self.patterns)

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """``(query group, key/value group)`` pairs, in group order."""
        index = {g: i for i, g in enumerate(self.groups)}
        pairs = {(q, k) for c in self.calls for q in c.queries for k in c.key_names}
        return tuple(sorted(pairs, key=lambda e: (index[e[0]], index[e[1]])))

    def graph(self) -> networkx.DiGraph[str]:
        """Token-group graph: one node per group, an edge ``q -> kv`` when the
        queries of ``q`` attend to the tokens of ``kv``. Edges carry the index
        of the attention call (``call``) and the pair's modifiers (``modifiers``)."""
        import networkx

        graph: networkx.DiGraph[str] = networkx.DiGraph(name=self.name)
        for i, group in enumerate(self.groups):
            graph.add_node(group, index=i)
        for index, call in enumerate(self.calls):
            for q in call.queries:
                for k in call.keys:
                    graph.add_edge(q, k.name, call=index, modifiers=k.modifiers)
        return graph

    @property
    def families(self) -> tuple[str, ...]:
        """Declared families (``doc*``): group names that stand for any number
        of run-time groups."""
        return tuple(g for g in self.groups if is_family(g))

    def bind(self, names: Sequence[str]) -> Plan:
        """This plan for the run-time groups ``names``: each family replaced by
        the names that start with its prefix (in the order given, at the
        family's place), rules expanded over them, ``-> self`` rules made one
        per member. Cached per tuple of names; a plan without families is its
        own binding.

        >>> import patternc
        >>> plan = patternc.compile("groups doc*\\ndoc* -> self [causal]").patterns["default"]
        >>> bound = plan.bind(["doc0", "doc1"])
        >>> bound.groups, [(r.queries, r.keys_values) for r in bound.rules]
        (('doc0', 'doc1'), [(('doc0',), ('doc0',)), (('doc1',), ('doc1',))])
        """
        if not self.families:
            return self
        key = tuple(names)

        def build() -> Plan:
            bound = bind(self.groups, self.families, self.rules, self.types, key)
            return Plan(self.name, bound.groups, bound.rules, bound.group_types)

        return BINDINGS.get_or_build((self, key), build)

    def per_row(self, rows: Sequence[Sequence[str]]) -> Plan:
        """This plan once per row of a batch whose rows hold different
        groups: ``rows[r]`` names row ``r``'s groups (its sizes dict's keys,
        family members included). Each row's binding is renamed apart, group
        ``g`` of row ``r`` becoming ``g@r``, and the rows are put end to end
        (see :mod:`patternc.lower.rows`): no rule crosses rows and group types
        are kept. Laid out at the rows' sizes end to end, it attends as each
        row would alone. Cached per tuple of rows in :data:`ROWS`.

        >>> import patternc
        >>> program = patternc.compile("groups image text\\nimage -> image\\ntext -> image, text[causal]")
        >>> program.patterns["default"].per_row([["image", "text"], ["image", "text"]]).groups
        ('image@0', 'text@0', 'image@1', 'text@1')

        Raises:
            PatternError: a row naming a group the plan does not have (E401,
                E405), lacking one (E403) or in another order (E404); each
                message names the row.
        """
        key = tuple(tuple(names) for names in rows)

        def build() -> Plan:
            bound: list[Bound] = []
            problems: list[Diagnostic] = []
            for row, names in enumerate(key):
                try:
                    plan = self.bind(names)
                except PatternError as error:
                    problems.extend(in_row(d, row) for d in error.diagnostics)
                    continue
                found = check_row(row, names, plan.groups)
                problems.extend(found)
                if not found:
                    types = plan.types
                    bound.append(Bound(plan.groups, plan.rules, tuple(types[g] for g in plan.groups)))
            if problems:
                raise PatternError(problems)
            stacked = stack_rows(bound)
            return Plan(self.name, stacked.groups, stacked.rules, stacked.group_types)

        return ROWS.get_or_build((self, key), build)

    def layout(self, sizes: Sizes) -> Layout:
        """The plan laid out at ``sizes`` (see :class:`~patternc.lower.layout.Layout`),
        families bound to the groups ``sizes`` names; cached per (plan, sizes)
        in :data:`LAYOUTS`.

        Raises:
            PatternError: sizes that do not fit the plan (unknown, missing or
                negative sizes; a ``TokenSpec`` list in another order; a
                shaped group a neighbourhood reads with another size than
                its shape's, unless ``sizes`` is a rank's
                :class:`~patternc.lower.layout.ShardSizes`).
        """
        layout = LAYOUTS.get_or_build(layout_key(self, sizes), lambda: self._build_layout(sizes))
        if layout.off_shape and not isinstance(sizes, ShardSizes):
            raise PatternError(list(layout.off_shape))
        return layout

    def _build_layout(self, sizes: Sizes) -> Layout:
        names = names_of(sizes)
        plan = self.bind(names)
        if names != plan.groups and set(names) == set(plan.groups):
            # sizes say where each group sits in x, a dict as a TokenSpec list
            # does: another order than the plan's would attend the wrong tokens
            if isinstance(sizes, Mapping):
                message = f"sizes name {list(names)} but the plan's groups are {list(plan.groups)}"
                where, hint = "sizes", "give the groups in the plan's order, the order they have in x"
            else:
                message = f"token_specs name {list(names)} but the plan's groups are {list(plan.groups)}"
                where, hint = "token_specs", "build token_specs with plan.token_specs(sizes)"
            raise PatternError(
                [Diagnostic(Code.WRONG_GROUP_ORDER, message + " (in this order)", where=where, hint=hint)]
            )
        layout = build_layout(plan, normalize_sizes(plan.groups, sizes))
        # names and sizes are checked: no second validation per group
        specs = tuple(TokenSpec.model_construct(name=g, size=n) for g, n in layout.sizes)
        return dataclasses.replace(layout, token_specs=specs)

    def token_specs(self, sizes: Sizes) -> list[TokenSpec]:
        """``TokenSpec`` list in the plan's group order, for ``MixedAttention``
        (kept with the layout: models call this on every forward)."""
        layout = self.layout(sizes)
        specs = layout.token_specs or tuple(TokenSpec(name=g, size=n) for g, n in layout.sizes)
        return list(specs)


def sizes_key(sizes: Sizes) -> tuple[tuple[str, int | None], ...]:
    """``((group, size), ...)`` of a sizes dict or a ``TokenSpec`` list (the
    caches' key), or a ``TypeError`` that shows the two accepted forms."""
    if isinstance(sizes, Mapping):
        return tuple(sizes.items())
    try:
        return tuple((s.name, s.size) for s in sizes)
    except (AttributeError, TypeError):
        shown = repr(sizes) if len(repr(sizes)) < 60 else type(sizes).__name__
        raise TypeError(
            f"sizes must be a {{group: size}} dict or a list of TokenSpec, got {shown}; "
            'e.g. {"anchors": 1024, "queries": 4096}'
        ) from None


def layout_key(plan: Plan, sizes: Sizes) -> tuple[Plan, tuple[tuple[str, int | None], ...]]:
    """The key of ``plan``'s layout at ``sizes`` in :data:`LAYOUTS`."""
    return plan, sizes_key(sizes)


def layout_weight(layout: Layout) -> int:
    """A layout's approximate bytes: its records grow with its groups, calls,
    segments and slices of key runs (a few hundred bytes each), so the cache
    bounds memory as well as entries. Its tables are counted apart
    (``layout.tables.nbytes``); its group pairs are read from the calls on
    demand (:class:`~patternc.lower.layout.GroupPairs`), not held."""
    segments = sum(len(c.queries) + len(c.keys) for c in layout.calls)
    slices = sum(len(Keys.of(c.attention.keys).parts) for c in layout.calls)
    return 256 * (len(layout.slots) + len(layout.calls) + segments + slices) + 4096


LayoutKey = tuple[Plan, tuple[tuple[str, int | None], ...]]


def _with_tables(layout: Layout) -> int:
    return layout_weight(layout) + layout.tables.nbytes


def _report_growth(key: LayoutKey, layout: Layout) -> None:
    """A stored layout's tables report their growth to :data:`LAYOUTS`."""
    layout.tables.attach(functools.partial(LAYOUTS.charge, key, layout))


LAYOUTS: BoundedCache[LayoutKey, Layout] = BoundedCache(
    "layouts", 4096, weigh=_with_tables, max_weight=3 << 29, on_store=_report_growth
)
"""The one per-(plan, sizes) cache: key ``(plan, ((group, size), ...))`` (sizes
as given: a dict's items or a ``TokenSpec`` list's ``(name, size)`` pairs, in
order) -> the :class:`~patternc.lower.layout.Layout`, which owns every record
derived from that pair, device tables and ``auto``'s pick included
(``layout.tables``, see :mod:`patternc.lower.tables`). At most 4096 layouts
and about 1.5 GB of layouts and their tables together; an evicted layout
takes its tables with it."""

BINDINGS: BoundedCache[tuple[Plan, tuple[str, ...]], Plan] = BoundedCache("bindings", 1024)
"""Key ``(plan, group names)`` -> the plan with its families bound to those names."""

ROWS: BoundedCache[tuple[Plan, tuple[tuple[str, ...], ...]], Plan] = BoundedCache("rows", 256)
"""Key ``(plan, (row 0's group names, row 1's, ...))`` -> the plan stacked
once per row (:meth:`Plan.per_row`)."""


PLANS_BY_ID: weakref.WeakValueDictionary[int, Plan] = weakref.WeakValueDictionary()
"""``id(plan)`` -> the plan, for every live plan (each plan enters itself
when made or unpickled; patternc makes no plan inside a trace: the compile
boundary makes bound and per-row plans outside it). A ``torch.compile`` trace hands
plain-Python helpers constants only, and a plan is not one before torch
2.13, so a trace names a plan by ``id`` and such a helper finds it here (see
:mod:`patternc.nn.traced_layouts`). Weak values: an entry ends with its plan,
so an ``id`` found here is always that plan's."""


CHECKED_PATTERNS: BoundedCache[tuple[Any, ...], Plan] = BoundedCache("checked patterns", 512)
"""Key ``(((group, cached), ...), patterns)`` -> the checked plan of a hand-written list."""


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


def names_of(sizes: Sizes) -> tuple[str, ...]:
    """Group names of a sizes dict or a TokenSpec list, in order."""
    return tuple(sizes) if isinstance(sizes, Mapping) else tuple(spec.name for spec in sizes)


@dataclass(frozen=True)
class Program:
    """A compiled pattern file: its groups and one :class:`Plan` per pattern."""

    filename: str | None
    groups: tuple[str, ...]
    patterns: Mapping[str, Plan]
    types: Mapping[str, str]
    """``{group: type}`` (the ``types`` block, else each group's domain)."""
    warnings: tuple[Diagnostic, ...] = ()
    """Warnings the compiler found (``W`` codes); errors raise instead."""

    @property
    def type_names(self) -> tuple[str, ...]:
        """Distinct token types in order of first appearance among the groups:
        the weight banks of untied layers, in bank order."""
        return tuple(dict.fromkeys(self.types.values()))

    def __getitem__(self, name: str) -> Plan:
        try:
            return self.patterns[name]
        except KeyError:
            hint = suggest(name, self.patterns) or f"patterns are: {', '.join(self.patterns)}"
            raise KeyError(f"no pattern `{name}`; {hint}") from None

    def select(self, names: Sequence[str] | None) -> list[Plan]:
        return [self[n] for n in names] if names else list(self.patterns.values())
