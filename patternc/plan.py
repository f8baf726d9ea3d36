"""Plans: what the compiler hands to the runtime.

A :class:`Plan` is one checked pattern: its rules, the seed-style
``AttentionPattern`` list (rules with the same key/value set merged into one
attention call), and the token-group graph. Given group sizes it lays the
tokens out (:class:`Layout`): offsets, each call's ``Nq x Nkv``, whether a
call's tokens are one contiguous slice (a view) or need a gather, which calls
share a shape and so stack into one attention launch, and what it all costs
against dense attention. Executors read the layout; they never re-derive it.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from patternc.diagnostics import Code, Diagnostic, PatternError, suggest
from patternc.modifiers import NO_MODIFIERS, Modifiers
from patternc.resolve import ResolvedRule, is_family
from patternc.schemas import AttentionPattern, TokenSpec, domain_of

if TYPE_CHECKING:
    import networkx

__all__ = ["Access", "CallShape", "GroupSlot", "Layout", "Plan", "Program", "Sizes"]

JSON_SCHEMA_VERSION = 1

Sizes = Union[Mapping[str, Union[int, None]], Sequence[TokenSpec]]
"""Group sizes: ``{"surface_anchors": 1024, ...}`` or a list of ``TokenSpec``.
A size of ``None`` marks a group whose keys/values come from a KV cache."""

Access = Literal["view", "gather", "empty"]
"""How a call reads its tokens: one contiguous slice (``view``, no copy),
several slices copied together (``gather``), or no tokens at all."""


@dataclass(frozen=True, slots=True)
class GroupSlot:
    """Where a group sits: ``offset`` into the input (or into the cache when
    ``size`` is None, in which case ``offset`` is -1)."""

    name: str
    offset: int
    size: int | None

    @property
    def cached(self) -> bool:
        return self.size is None


@dataclass(frozen=True, slots=True)
class CallShape:
    """One attention call of a plan at given sizes. Counts cover input tokens;
    cached groups add their cache length at run time."""

    index: int
    query_tokens: tuple[str, ...]
    key_value_tokens: tuple[str, ...]
    n_queries: int
    n_keys_values: int
    query_access: Access
    key_value_access: Access
    modifiers: Modifiers = NO_MODIFIERS

    @property
    def score_entries(self) -> int:
        return self.n_queries * self.n_keys_values


@dataclass(frozen=True, slots=True)
class Layout:
    """A plan laid out for concrete group sizes."""

    slots: tuple[GroupSlot, ...]
    calls: tuple[CallShape, ...]
    launches: tuple[tuple[int, ...], ...]
    """Indices of calls of equal ``(Nq, Nkv)``; each tuple is one stacked launch."""

    @property
    def n_tokens(self) -> int:
        """Tokens in the input tensor (cached groups excluded)."""
        return sum(s.size for s in self.slots if s.size is not None)

    @property
    def score_entries(self) -> int:
        return sum(c.score_entries for c in self.calls)

    @property
    def dense_entries(self) -> int:
        """Score entries of dense attention: every input token to every token."""
        return self.n_tokens * self.n_tokens

    @property
    def density(self) -> float:
        return self.score_entries / self.dense_entries if self.dense_entries else 0.0

    def flops(self, dim: int) -> int:
        """Attention FLOPs (``QK^T`` and ``PV``) at model width ``dim``."""
        return 4 * self.score_entries * dim

    def slot(self, name: str) -> GroupSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)


def _access(names: Sequence[str], slots: Mapping[str, GroupSlot]) -> Access:
    present = [slots[n] for n in names if slots[n].cached or slots[n].size]
    if not present:
        return "empty"
    if any(s.cached for s in present):
        return "view" if len(present) == 1 else "gather"
    ordered = sorted(present, key=lambda s: s.offset)
    contiguous = all(a.offset + (a.size or 0) == b.offset for a, b in itertools.pairwise(ordered))
    return "view" if contiguous else "gather"


def normalize_sizes(groups: Sequence[str], sizes: Sizes) -> dict[str, int | None]:
    """Sizes as ``{group: size}`` for exactly the declared groups, or a
    :class:`PatternError` naming unknown and missing groups."""
    if isinstance(sizes, Mapping):
        given: dict[str, int | None] = dict(sizes)
    else:
        given = {}
        for spec in sizes:
            given[spec.name] = spec.size
    diagnostics = []
    for name, size in given.items():
        if name not in groups:
            diagnostics.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    f"size given for unknown group `{name}`",
                    where="sizes",
                    hint=suggest(name, groups) or f"groups are: {', '.join(groups)}",
                )
            )
        elif size is not None and (not isinstance(size, int) or size < 0):
            diagnostics.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    f"size of `{name}` must be an integer >= 0, got {size!r}",
                    where="sizes",
                )
            )
    missing = [g for g in groups if g not in given]
    if missing:
        diagnostics.append(
            Diagnostic(
                Code.NOT_EXHAUSTIVE,
                "no size given for " + ", ".join(f"`{g}`" for g in missing),
                where="sizes",
                hint="give every group a size (None for a group read from the KV cache)",
            )
        )
    if diagnostics:
        raise PatternError(diagnostics)
    return {g: given[g] for g in groups}


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

    @functools.cached_property
    def types(self) -> dict[str, str]:
        """``{group: type}``: the weight bank untied layers use for each group."""
        if self.group_types:
            return dict(zip(self.groups, self.group_types))
        return {g: domain_of(g.rstrip("*")) for g in self.groups}

    @property
    def type_names(self) -> tuple[str, ...]:
        """Distinct types in order of first appearance among the groups."""
        return tuple(dict.fromkeys(self.types.values()))

    @functools.cached_property
    def calls(self) -> tuple[tuple[AttentionPattern, Modifiers], ...]:
        """Attention calls: rules merged by (key/value set, modifiers), in order
        of each call's first rule."""
        merged: dict[tuple[tuple[str, ...], Modifiers], set[str]] = {}
        for rule in self.rules:
            merged.setdefault((rule.keys_values, rule.modifiers), set()).update(rule.queries)
        index = {g: i for i, g in enumerate(self.groups)}
        return tuple(
            (
                AttentionPattern(query_tokens=tuple(sorted(q, key=index.__getitem__)), key_value_tokens=kv),
                mods,
            )
            for (kv, mods), q in merged.items()
        )

    @functools.cached_property
    def patterns(self) -> tuple[AttentionPattern, ...]:
        """The calls' patterns (modifiers aside)."""
        return tuple(pattern for pattern, _ in self.calls)

    @property
    def call_modifiers(self) -> tuple[Modifiers, ...]:
        return tuple(mods for _, mods in self.calls)

    @property
    def has_modifiers(self) -> bool:
        return any(self.call_modifiers)

    @property
    def attention_patterns(self) -> list[AttentionPattern]:
        """The seed-style pattern list ``MixedAttention`` takes. It cannot carry
        modifiers (``[causal]``...): pass the plan itself to keep them."""
        return list(self.patterns)

    @functools.cached_property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """``(query group, key/value group)`` pairs, in group order."""
        index = {g: i for i, g in enumerate(self.groups)}
        pairs = {(q, kv) for p in self.patterns for q in p.query_tokens for kv in p.key_value_tokens}
        return tuple(sorted(pairs, key=lambda e: (index[e[0]], index[e[1]])))

    @functools.cached_property
    def graph(self) -> networkx.DiGraph[str]:
        """Token-group graph: one node per group, an edge ``q -> kv`` when the
        queries of ``q`` attend to the tokens of ``kv``. Edges carry the index
        of the attention call (``call``) that computes them."""
        import networkx

        graph: networkx.DiGraph[str] = networkx.DiGraph(name=self.name)
        for i, group in enumerate(self.groups):
            graph.add_node(group, index=i)
        for call, pattern in enumerate(self.patterns):
            for q in pattern.query_tokens:
                for kv in pattern.key_value_tokens:
                    graph.add_edge(q, kv, call=call)
        return graph

    @property
    def families(self) -> tuple[str, ...]:
        """Declared families (``doc*``): group names that stand for any number
        of run-time groups."""
        return tuple(g for g in self.groups if is_family(g))

    @functools.cached_property
    def _bindings(self) -> dict[tuple[str, ...], Plan]:
        return {}

    def bind(self, names: Sequence[str]) -> Plan:
        """This plan for the run-time groups ``names``: each family replaced by
        the names that start with its prefix (in the order given, at the
        family's place), rules expanded over them, ``-> self`` rules made one
        per member. Cached per tuple of names; a plan without families is its
        own binding.

        >>> import patternc
        >>> plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
        >>> bound = plan.bind(["doc0", "doc1"])
        >>> bound.groups, [(r.queries, r.keys_values) for r in bound.rules]
        (('doc0', 'doc1'), [(('doc0',), ('doc0',)), (('doc1',), ('doc1',))])
        """
        if not self.families:
            return self
        key = tuple(names)
        bound = self._bindings.get(key)
        if bound is None:
            bound = _bind(self, key)
            if len(self._bindings) < 1024:
                self._bindings[key] = bound
        return bound

    def __hash__(self) -> int:
        # structural, as equality is, but computed once: plans key the
        # runtime's per-layout caches on every forward call
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.name, self.groups, self.rules, self.group_types))

    @functools.cached_property
    def _specs(self) -> dict[tuple[tuple[str, int | None], ...], tuple[TokenSpec, ...]]:
        return {}

    def token_specs(self, sizes: Sizes) -> list[TokenSpec]:
        """``TokenSpec`` list in the plan's group order, for ``MixedAttention``
        (memoised per sizes: models call this on every forward)."""
        key = tuple(sizes.items()) if isinstance(sizes, Mapping) else tuple((s.name, s.size) for s in sizes)
        specs = self._specs.get(key)
        if specs is None:
            plan = self.bind(names_of(sizes))
            specs = tuple(TokenSpec(name=g, size=s) for g, s in normalize_sizes(plan.groups, sizes).items())
            if len(self._specs) < 4096:
                self._specs[key] = specs
        return list(specs)

    def layout(self, sizes: Sizes) -> Layout:
        """Lay the plan out for concrete sizes (see :class:`Layout`)."""
        plan = self.bind(names_of(sizes))
        return _layout(plan, tuple(normalize_sizes(plan.groups, sizes).items()))

    # ------------------------------------------------------------ exports

    def to_dict(self, sizes: Sizes | None = None, *, dim: int = 192) -> dict[str, Any]:
        """The plan as JSON-ready data (schema in ``docs/plan-format.md``)."""
        data: dict[str, Any] = {
            "name": self.name,
            "rules": [
                {
                    "text": r.text,
                    "line": r.span.line if r.span else None,
                    "column": r.span.column if r.span else None,
                    "queries": list(r.queries),
                    "keys_values": list(r.keys_values),
                    "modifiers": r.modifiers.to_dict(),
                }
                for r in self.rules
            ],
            "attention_patterns": [
                {
                    "query_tokens": list(p.query_tokens),
                    "key_value_tokens": list(p.key_value_tokens),
                    "modifiers": m.to_dict(),
                }
                for p, m in self.calls
            ],
            "edges": [list(e) for e in self.edges],
            "types": self.types,
            "layout": None,
        }
        if sizes is not None:
            data["layout"] = _layout_dict(self.layout(sizes), dim)
            if self.families:
                data["bound_groups"] = list(self.bind(names_of(sizes)).groups)
        return data

    def to_json(self, sizes: Sizes | None = None, *, dim: int = 192) -> str:
        return json.dumps(self.to_dict(sizes, dim=dim), indent=2) + "\n"

    def to_dot(self) -> str:
        """Graphviz source of the token-group graph."""
        return _dot([self])


def names_of(sizes: Sizes) -> tuple[str, ...]:
    """Group names of a sizes dict or a TokenSpec list, in order."""
    return tuple(sizes) if isinstance(sizes, Mapping) else tuple(spec.name for spec in sizes)


def _bind(plan: Plan, names: tuple[str, ...]) -> Plan:
    concrete = set(plan.groups) - set(plan.families)
    # longest prefix first, so `doc_title*` wins over `doc*`
    families = sorted(plan.families, key=len, reverse=True)
    members: dict[str, list[str]] = {f: [] for f in plan.families}
    problems = []
    for name in dict.fromkeys(names):
        if name in concrete:
            continue
        family = next((f for f in families if name.startswith(f[:-1])), None)
        if family is None:
            problems.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    f"group `{name}` is neither a declared group nor a member of a family",
                    where="sizes",
                    hint=suggest(name, sorted(concrete))
                    or f"families: {', '.join(f'`{f}`' for f in plan.families)}",
                )
            )
        else:
            members[family].append(name)

    def expand(groups: Sequence[str]) -> tuple[str, ...]:
        return tuple(m for g in groups for m in (members[g] if g in members else [g]))

    rules: list[ResolvedRule] = []
    for rule in plan.rules:
        queries = expand(rule.queries)
        if rule.to_self:
            rules.extend(
                ResolvedRule((q,), (q,), rule.span, rule.text, rule.where, rule.modifiers, True)
                for q in queries
            )
            continue
        keys_values = expand(rule.keys_values)
        if queries and not keys_values:
            problems.append(
                Diagnostic(
                    Code.EMPTY_SIDE,
                    f"rule `{rule.text}` ({rule.location()}) has queries but no keys: its families "
                    "have no groups in this input",
                    where="sizes",
                    hint="give the family at least one group, or attend to a declared group too",
                )
            )
        elif queries:
            rules.append(ResolvedRule(queries, keys_values, rule.span, rule.text, rule.where, rule.modifiers))
    if problems:
        raise PatternError(problems)
    groups = expand(plan.groups)
    types = plan.types
    group_types = tuple(types[g] for g in plan.groups for _ in (members[g] if g in members else [g]))
    return Plan(plan.name, groups, tuple(rules), group_types)


@functools.lru_cache(maxsize=256)
def _layout(plan: Plan, sizes: tuple[tuple[str, int | None], ...]) -> Layout:
    slots: dict[str, GroupSlot] = {}
    offset = 0
    for name, size in sizes:
        if size is None:
            slots[name] = GroupSlot(name, -1, None)
        else:
            slots[name] = GroupSlot(name, offset, size)
            offset += size
    calls = []
    for i, (pattern, modifiers) in enumerate(plan.calls):
        queries = tuple(q for q in pattern.query_tokens if not slots[q].cached)
        calls.append(
            CallShape(
                index=i,
                query_tokens=queries,
                key_value_tokens=pattern.key_value_tokens,
                n_queries=sum(slots[q].size or 0 for q in queries),
                n_keys_values=sum(slots[k].size or 0 for k in pattern.key_value_tokens),
                query_access=_access(queries, slots),
                key_value_access=_access(pattern.key_value_tokens, slots),
                modifiers=modifiers,
            )
        )
    by_shape: dict[tuple[int, int, Modifiers], list[int]] = {}
    for call in calls:
        if call.n_queries:
            by_shape.setdefault((call.n_queries, call.n_keys_values, call.modifiers), []).append(call.index)
    return Layout(tuple(slots.values()), tuple(calls), tuple(tuple(v) for v in by_shape.values()))


def _layout_dict(layout: Layout, dim: int) -> dict[str, Any]:
    return {
        "tokens": layout.n_tokens,
        "groups": [
            {"name": s.name, "offset": s.offset if not s.cached else None, "size": s.size, "cached": s.cached}
            for s in layout.slots
        ],
        "calls": [
            {
                "query_tokens": list(c.query_tokens),
                "key_value_tokens": list(c.key_value_tokens),
                "n_queries": c.n_queries,
                "n_keys_values": c.n_keys_values,
                "query_access": c.query_access,
                "key_value_access": c.key_value_access,
                "modifiers": c.modifiers.to_dict(),
                "flops": 4 * c.score_entries * dim,
            }
            for c in layout.calls
        ],
        "launches": [list(group) for group in layout.launches],
        "dim": dim,
        "flops": layout.flops(dim),
        "dense_flops": 4 * layout.dense_entries * dim,
        "density": round(layout.density, 6),
    }


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dot(plans: Sequence[Plan]) -> str:
    lines = ["digraph patternc {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for i, plan in enumerate(plans):
        prefix = f"p{i}_"
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_quote('pattern ' + plan.name)};")
        for group in plan.groups:
            label = f"{group}\n({plan.types[group]})"
            lines.append(f"    {prefix}{group} [label={_quote(label)}];")
        for call, (pattern, mods) in enumerate(plan.calls):
            label = f"call {call} {mods.text()}".rstrip()
            for q in pattern.query_tokens:
                for kv in pattern.key_value_tokens:
                    lines.append(f"    {prefix}{q} -> {prefix}{kv} [label={_quote(label)}];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Program:
    """A compiled pattern file: its groups and one :class:`Plan` per pattern."""

    filename: str | None
    groups: tuple[str, ...]
    patterns: Mapping[str, Plan]
    types: Mapping[str, str]
    """``{group: type}`` (the ``types`` block, else each group's domain)."""

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

    def to_dict(
        self, sizes: Sizes | None = None, *, dim: int = 192, patterns: Sequence[str] | None = None
    ) -> dict[str, Any]:
        return {
            "schema": "patternc.plan",
            "version": JSON_SCHEMA_VERSION,
            "file": self.filename,
            "groups": list(self.groups),
            "types": dict(self.types),
            "patterns": [plan.to_dict(sizes, dim=dim) for plan in self.select(patterns)],
        }

    def to_json(
        self, sizes: Sizes | None = None, *, dim: int = 192, patterns: Sequence[str] | None = None
    ) -> str:
        return json.dumps(self.to_dict(sizes, dim=dim, patterns=patterns), indent=2) + "\n"

    def to_dot(self, patterns: Sequence[str] | None = None) -> str:
        return _dot(self.select(patterns))
