"""Rows: one plan laid out once per row of a batch whose rows hold different
groups or sizes (packed documents of different counts, images and texts of
different lengths).

Each row's plan (already bound to that row's groups) is renamed apart, group
``g`` of row ``r`` becoming ``g@r`` (``@`` is no character of a group name,
so no name collides), and the rows' groups and rules are put end to end.
No rule names groups of two rows, so a query of one row never reads a key of
another; group types are kept, so untied weights pick the same bank. Laid
out at the rows' sizes end to end, the stacked plan is one ordinary plan
that every executor runs. Works on the plans' fields, as
:mod:`~patternc.lower.bind` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from patternc.diagnostics import Code, Diagnostic
from patternc.ir import KeyGroup, KeyRun, Keys, ResolvedRule
from patternc.lower.bind import Bound

__all__ = ["ROW_MARK", "check_row", "in_row", "row_name", "stack_rows"]

ROW_MARK = "@"
"""Between a group's name and its row in a stacked plan (``text@2``)."""


def row_name(group: str, row: int) -> str:
    """The name of ``group`` of row ``row`` in a stacked plan."""
    return f"{group}{ROW_MARK}{row}"


def stack_rows(rows: Sequence[Bound]) -> Bound:
    """The plans ``rows`` (each bound, without families) end to end, each
    row's groups renamed with :func:`row_name`, its rules repeated over its
    own groups only."""
    groups: list[str] = []
    rules: list[ResolvedRule] = []
    types: list[str] = []
    for row, bound in enumerate(rows):
        groups.extend(row_name(g, row) for g in bound.groups)
        types.extend(bound.group_types)
        # each run of keys renamed once per row: a block-causal row's rules
        # read slices of one run, which stay slices
        renamed: dict[int, KeyRun] = {}

        def rename(key: KeyGroup, row: int = row) -> KeyGroup:
            return KeyGroup(row_name(key.name, row), key.modifiers)

        for rule in bound.rules:
            queries = tuple(row_name(q, row) for q in rule.queries)
            keys = Keys.of(rule.keys).mapped(rename, renamed)
            rules.append(dataclasses.replace(rule, queries=queries, keys=keys))
    return Bound(tuple(groups), tuple(rules), tuple(types))


def in_row(diagnostic: Diagnostic, row: int) -> Diagnostic:
    """``diagnostic`` about the sizes of one row, said to be about that row."""
    return dataclasses.replace(diagnostic, message=f"row {row}: {diagnostic.message}", where=f"sizes[{row}]")


def check_row(row: int, names: Sequence[str], groups: Sequence[str]) -> list[Diagnostic]:
    """Problems of row ``row`` whose sizes name ``names`` for a plan bound to
    ``groups``: unknown groups (E401), groups without a size (E403), the
    groups in another order than the plan's, which is their order in ``x`` (E404)."""
    where = f"sizes[{row}]"
    unknown = [n for n in names if n not in groups]
    missing = [g for g in groups if g not in names]
    problems = []
    if unknown:
        problems.append(
            Diagnostic(
                Code.SIZE_FOR_UNKNOWN_GROUP,
                f"row {row}: sizes name {unknown}, which the plan does not have",
                where=where,
                hint=f"the plan's groups are {list(groups)}; drop or rename these in row {row}'s dict",
            )
        )
    if missing:
        problems.append(
            Diagnostic(
                Code.MISSING_SIZE,
                f"row {row}: no size for {missing}",
                where=where,
                hint=f"give every group a size in row {row}'s dict (0 for a group the row lacks)",
            )
        )
    if not problems and tuple(names) != tuple(groups):
        problems.append(
            Diagnostic(
                Code.WRONG_GROUP_ORDER,
                f"row {row}: sizes name {list(names)} but the plan's groups are {list(groups)} "
                "(in this order)",
                where=where,
                hint="give the groups in the plan's order, the order they have in the row of x",
            )
        )
    return problems
