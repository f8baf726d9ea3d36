"""Binding: a plan with families (``doc*``) made concrete for the groups
one input has. Rules are expanded over the members; ``-> self`` rules become
one per member. Results are cached in :data:`patternc.cache.BINDINGS`."""

from __future__ import annotations

from collections.abc import Sequence

from patternc.diagnostics import Code, Diagnostic, PatternError, suggest
from patternc.ir import KeyGroup, ResolvedRule
from patternc.plan import Plan

__all__ = ["bind"]


def bind(plan: Plan, names: tuple[str, ...]) -> Plan:
    """``plan`` for the run-time groups ``names`` (see :meth:`Plan.bind`)."""
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
                    Code.NOT_A_MEMBER,
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
            (key,) = rule.keys
            rules.extend(
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
            rules.append(ResolvedRule(queries, keys, rule.span, rule.text, rule.where))
    if problems:
        raise PatternError(problems)
    types = plan.types
    group_types = tuple(types[g] for g in plan.groups for _ in (members[g] if g in members else [g]))
    return Plan(plan.name, expand(plan.groups), tuple(rules), group_types)
