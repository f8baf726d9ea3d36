"""Binding: a plan with families (``doc*``) made concrete for the groups
one input has. Rules are expanded over the members; ``-> self`` rules become
one per member. Works on the plan's fields, so the plan floor above builds
the bound :class:`~patternc.Plan` from what this returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from patternc.diagnostics import Code, Diagnostic, PatternError, suggest
from patternc.ir import KeyGroup, ResolvedRule

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

    Raises:
        PatternError: a name that is neither a group nor a family member
            (E405), or a rule whose families have no member here.
    """
    concrete = set(groups) - set(families)
    # longest prefix first, so `doc_title*` wins over `doc*`
    by_length = sorted(families, key=len, reverse=True)
    members: dict[str, list[str]] = {f: [] for f in families}
    problems = []
    for name in dict.fromkeys(names):
        if name in concrete:
            continue
        family = next((f for f in by_length if name.startswith(f[:-1])), None)
        if family is None:
            problems.append(
                Diagnostic(
                    Code.NOT_A_MEMBER,
                    f"group `{name}` is neither a declared group nor a member of a family",
                    where="sizes",
                    hint=suggest(name, sorted(concrete))
                    or f"families: {', '.join(f'`{f}`' for f in families)}",
                )
            )
        else:
            members[family].append(name)

    def expand(groups: Sequence[str]) -> tuple[str, ...]:
        return tuple(m for g in groups for m in (members[g] if g in members else [g]))

    bound: list[ResolvedRule] = []
    for rule in rules:
        queries = expand(rule.queries)
        if rule.to_self:
            (key,) = rule.keys
            bound.extend(
                ResolvedRule((q,), (KeyGroup(q, key.modifiers),), rule.span, rule.text, rule.where, True)
                for q in queries
            )
            continue
        keys = tuple(KeyGroup(m, k.modifiers) for k in rule.keys for m in expand([k.name]))
        if queries and not keys:
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
    group_types = tuple(types[g] for g in groups for _ in (members[g] if g in members else [g]))
    return Bound(expand(groups), tuple(bound), group_types)
