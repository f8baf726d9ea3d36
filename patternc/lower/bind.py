"""Binding: a plan with families (``doc*``) made concrete for the groups
one input has. Rules are expanded over the members; ``-> self`` rules become
one per member. Works on the plan's fields, so the plan floor above builds
the bound :class:`~patternc.Plan` from what this returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from patternc.diagnostics import Code, Diagnostic, PatternError, suggest
from patternc.ir import KeyGroup, KeyRun, Keys, ResolvedRule
from patternc.members import GRID_RELATIONS, FamilyMembers, member_hint
from patternc.modifiers import Modifiers

__all__ = ["Bound", "bind"]


class Bound(NamedTuple):
    """A plan's fields with its families expanded over run-time groups."""

    groups: tuple[str, ...]
    rules: tuple[ResolvedRule, ...]
    group_types: tuple[str, ...]


def bind(
    groups: Sequence[str],
    families: Sequence[str],
    rules: Sequence[ResolvedRule],
    types: Mapping[str, str],
    names: Sequence[str],
) -> Bound:
    """The plan ``(groups, rules, types)`` for the run-time groups ``names``
    (see :meth:`patternc.Plan.bind`); ``families`` are the family groups.

    A rule whose keys carry member relations (``frame*[upto]``, ``self``)
    becomes one rule per query member, with the key members it reads as
    slices of one :class:`~patternc.ir.KeyRun` per key (the family's
    members in ordinal order): ``M`` members bind ``M`` rules of a few
    slices each, whatever the number of (query, key) pairs.

    Raises:
        PatternError: a name that is neither a group nor a family member
            (E405), a rule whose families have no member here (E406), or a
            member that a relation leaves with no keys (E407), two members
            of a grid at one place (E408).
    """
    concrete = set(groups) - set(families)
    found = FamilyMembers.of(families, concrete, names)
    problems = [
        Diagnostic(
            Code.NOT_A_MEMBER,
            f"group `{name}` is neither a declared group nor a member of a family",
            where="sizes",
            hint=member_hint(name, families)
            or suggest(name, sorted(concrete))
            or f"families: {', '.join(f'`{f}`' for f in families)}",
        )
        for name in found.unmatched
    ]
    for family, first, second in found.same_place:
        at = ", ".join(str(c) for c in found.coordinates[first])
        problems.append(
            Diagnostic(
                Code.SAME_GRID_PLACE,
                f"`{second}` and `{first}` are both at ({at}) of `{family}`",
                where="sizes",
                hint="a grid has one member per place: name each coordinate once, with the same digits",
            )
        )
    bound: list[ResolvedRule] = []
    for rule in rules:
        queries = found.expand(rule.queries)
        if any(k.members is not None for k in rule.keys):
            bound.extend(_per_member(rule, queries, found, problems))
            continue
        keys = tuple(KeyGroup(m, k.modifiers) for k in rule.keys for m in found.expand([k.name]))
        if queries and not rule.keys:  # `-> nothing`: the queries read no key by design
            bound.append(ResolvedRule(queries, (), rule.span, rule.text, rule.where))
        elif queries and not keys:
            problems.append(
                Diagnostic(
                    Code.EMPTY_FAMILY,
                    f"rule `{rule.text}` ({rule.location()}) has queries but no keys: its families "
                    "have no groups in this input",
                    where="sizes",
                    hint="give the family at least one group, or attend to a declared group too",
                )
            )
        elif queries:
            bound.append(ResolvedRule(queries, keys, rule.span, rule.text, rule.where))
    if problems:
        raise PatternError(problems)
    ordered = found.token_order(groups, names)
    group_types = tuple(types[found.family_of.get(g, g)] for g in ordered)
    return Bound(ordered, tuple(bound), group_types)


def _per_member(
    rule: ResolvedRule, queries: Sequence[str], found: FamilyMembers, problems: list[Diagnostic]
) -> list[ResolvedRule]:
    """One rule per query member: each key with a relation gives the members
    it relates to that query, each key without one all of its members."""
    # each key's groups are one KeyRun made once, and every query's keys are
    # slices of those runs: a block-causal family of M members binds M rules
    # of O(1) parts each, not M(M+1)/2 (query, key) records. One object per
    # distinct modifier list: equal lists compare by identity downstream
    shared: dict[Modifiers, Modifiers] = {}
    mods = {k: shared.setdefault(k.modifiers, k.modifiers) for k in rule.keys}
    plain = {
        k: KeyRun(tuple(KeyGroup(m, mods[k]) for m in found.expand([k.name])))
        for k in rule.keys
        if k.members is None
    }
    # a relation on ordinals reads a range of the family's members in
    # ordinal order: a slice of the run of its members
    ordered = {
        k: KeyRun(tuple(KeyGroup(m, mods[k]) for m in found.by_ordinal.get(k.name, ([], []))[1]))
        for k in rule.keys
        if k.members is not None and k.members.kind not in ("self", *GRID_RELATIONS)
    }
    out = []
    for query in queries:
        parts: list[tuple[KeyRun, int, int]] = []
        for key in rule.keys:
            if key.members is None:
                parts.append((plain[key], 0, len(plain[key])))
            elif key in ordered:
                lo, hi = found.span(query, key.name, key.members)
                parts.append((ordered[key], lo, hi))
            else:
                related = tuple(KeyGroup(m, mods[key]) for m in found.related(query, key.name, key.members))
                parts.append((KeyRun(related), 0, len(related)))
        keys = Keys(parts)
        if not keys:
            problems.append(_no_member_keys(rule, query))
            continue
        out.append(ResolvedRule((query,), keys, rule.span, rule.text, rule.where, rule.to_self))
    return out


def _no_member_keys(rule: ResolvedRule, query: str) -> Diagnostic:
    """E407, naming the keys that selected no member and the fix that fits."""
    related = [k for k in rule.keys if k.members is not None]
    named = ", ".join(f"`{k.text()}`" for k in related)
    if related and all(k.members is not None and k.members.kind == "same" for k in related):
        hint = (
            f"the member of `{query}` has no such part in this input: give it one, or add `self` "
            f"(`{rule.queries[0]} -> {', '.join(k.text() for k in related)}, self`)"
        )
    else:
        hint = "add `self` to the keys, or a group every member reads (`frame* -> frame*[before], self`)"
    return Diagnostic(
        Code.NO_MEMBER_KEYS,
        f"`{query}` reads no keys under rule `{rule.text}` ({rule.location()}): "
        f"{named or 'its keys'} {'selects' if len(related) == 1 else 'select'} no member for it",
        where="sizes",
        hint=hint,
    )
