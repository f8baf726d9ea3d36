"""Checks that a set of rules is a valid attention pattern.

The rule ``MixedAttention`` depends on: every input group is a query in
exactly one rule (exhaustive and non-overlapping). The same check serves
pattern files (``patternc.compile``) and hand-written ``AttentionPattern``
lists (:func:`check_patterns`), so both report the same codes and messages.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from patternc.diagnostics import Code, Diagnostic, PatternError, Span, suggest
from patternc.ir import KeyGroup, ResolvedRule
from patternc.schemas import AttentionPattern, TokenSpec, as_token_specs
from patternc.syntax import GroupDecl, PatternBlock, SourceFile

__all__ = ["check_declarations", "check_patterns", "check_rules"]


def check_rules(
    pattern: str,
    input_groups: Sequence[str],
    rules: Sequence[ResolvedRule],
    *,
    pattern_span: Span | None = None,
    group_spans: Mapping[str, Span] | None = None,
    where: str | None = None,
    already_reported: Collection[str] = (),
) -> list[Diagnostic]:
    """Every group of ``input_groups`` must be a query in exactly one rule.

    Groups that are not inputs (cached groups) may appear as queries; they are
    skipped at run time. Groups that are a query in no rule are one
    diagnostic listing them, except those in ``already_reported`` (what a
    misspelt query selector was meant to name: its own error says so).
    """
    diagnostics: list[Diagnostic] = []
    inputs = set(input_groups)
    owner: dict[str, ResolvedRule] = {}
    for rule in rules:
        for group in rule.queries:
            if group not in inputs:
                continue
            first = owner.setdefault(group, rule)
            if first is not rule:
                diagnostics.append(
                    Diagnostic(
                        Code.OVERLAP,
                        f"group `{group}` is a query in two rules of pattern `{pattern}`: "
                        f"{first.location()} (`{first.text}`) and {rule.location()} (`{rule.text}`)"
                        if first.text
                        else f"group `{group}` is a query in two patterns: "
                        f"{first.location()} and {rule.location()}",
                        rule.span,
                        _overlap_hint(group, first, rule),
                        where=rule.where,
                    )
                )
    missing = [g for g in input_groups if g not in owner and g not in already_reported]
    if missing:
        span = pattern_span if pattern_span is not None else (group_spans or {}).get(missing[0])
        names = ", ".join(f"`{g}`" for g in missing)
        diagnostics.append(
            Diagnostic(
                Code.NOT_EXHAUSTIVE,
                f"group {names} is a query in no rule of pattern `{pattern}`"
                if len(missing) == 1
                else f"{len(missing)} groups are a query in no rule of pattern `{pattern}`: {names}",
                span,
                f"every input group attends to something: add a rule such as `{', '.join(missing)} -> ...`",
                where=where,
            )
        )
    return diagnostics


def _overlap_hint(group: str, first: ResolvedRule, second: ResolvedRule) -> str:
    keys = list(dict.fromkeys([*first.keys_values, *second.keys_values]))
    merge = f" (`{group} -> {', '.join(keys)}`)" if keys else ""
    return (
        f"a group's queries come from one rule: merge the keys into one rule{merge} "
        f"or drop `{group}` from one"
    )


def check_declarations(source: SourceFile, *, complete: bool = True) -> list[Diagnostic]:
    """Duplicate or missing groups, duplicate or empty patterns, stray rules.
    ``complete`` False: statements were left out after syntax errors, so
    nothing is reported missing (it may sit in a left-out line)."""
    diagnostics: list[Diagnostic] = []
    diagnostics.extend(_duplicates(source.groups, "group"))
    if not source.groups and complete:
        diagnostics.append(
            Diagnostic(
                Code.NO_GROUPS,
                "the file declares no token groups",
                Span.point(1, 1),
                "start the file with `groups NAME NAME ...`, e.g. `groups surface_anchors surface_queries`",
            )
        )
    diagnostics.extend(_duplicates(source.patterns, "pattern"))
    for block in source.patterns:
        if not block.rules and complete:
            diagnostics.append(
                Diagnostic(
                    Code.EMPTY_PATTERN,
                    f"pattern `{block.name}` has no rules",
                    block.name_span,
                    "add rules such as `* -> *` inside the braces, or delete the block",
                )
            )
    if source.patterns and source.top_level_rules:
        first = source.top_level_rules[0]
        diagnostics.append(
            Diagnostic(
                Code.MIXED_TOP_LEVEL,
                "rules outside a `pattern` block in a file that also has named patterns",
                first.span,
                "put them in a block of their own, e.g. `pattern default { ... }`",
            )
        )
    if not source.patterns and not source.top_level_rules and source.groups and complete:
        last = source.groups[-1].span
        diagnostics.append(
            Diagnostic(
                Code.NO_RULES,
                "the file has groups but no rules",
                last,
                "add rules such as `* -> *`, or `pattern NAME { ... }` blocks",
            )
        )
    return diagnostics


def _duplicates(items: Iterable[GroupDecl | PatternBlock], what: str) -> list[Diagnostic]:
    seen: dict[str, Span | None] = {}
    diagnostics = []
    for item in items:
        span = item.span if isinstance(item, GroupDecl) else item.name_span
        if item.name in seen:
            first = seen[item.name]
            at = f" (first at line {first.line})" if first is not None else ""
            diagnostics.append(
                Diagnostic(
                    Code.DUPLICATE_GROUP if what == "group" else Code.DUPLICATE_PATTERN,
                    f"{what} `{item.name}` is declared twice{at}",
                    span,
                    f"{what} names must be unique; rename or remove this one",
                )
            )
        else:
            seen[item.name] = span
    return diagnostics


def check_patterns(token_specs: Sequence[TokenSpec], attention_patterns: Sequence[AttentionPattern]) -> None:
    """Validate a hand-written pattern list; raise :class:`PatternError` with
    every problem found.

    The checks and messages are those of ``patternc check``: names resolve,
    no side is empty, and every input group (``size`` not None) is a query in
    exactly one pattern.

    >>> check_patterns([TokenSpec("a", 2), TokenSpec("b", 3)],
    ...                [AttentionPattern(["a", "b"], ["a"])])
    """
    specs = as_token_specs(token_specs)
    names = [s.name for s in specs]
    diagnostics: list[Diagnostic] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            diagnostics.append(
                Diagnostic(
                    Code.DUPLICATE_GROUP,
                    f"group `{name}` appears twice in token_specs",
                    where=f"token_specs[{i}]",
                    hint="group names must be unique",
                )
            )
        seen.add(name)
    if not attention_patterns:
        diagnostics.append(
            Diagnostic(Code.NO_PATTERNS, "no attention patterns given", where="attention_patterns")
        )
    rules: list[ResolvedRule] = []
    for i, pattern in enumerate(attention_patterns):
        sides: list[tuple[str, ...]] = []
        for field in ("query_tokens", "key_value_tokens"):
            where = f"attention_patterns[{i}].{field}"
            tokens: Sequence[str] = getattr(pattern, field)
            if not tokens:
                diagnostics.append(
                    Diagnostic(
                        Code.EMPTY_SIDE, f"{field} is empty", where=where, hint="name at least one group"
                    )
                )
            for j, token in enumerate(tokens):
                if token in tokens[:j]:
                    diagnostics.append(
                        Diagnostic(
                            Code.REPEATED_IN_LIST,
                            f"group `{token}` is listed twice in {field}",
                            where=f"{where}[{j}]",
                            hint="list each group once",
                        )
                    )
                elif token not in seen:
                    diagnostics.append(
                        Diagnostic(
                            Code.UNKNOWN_GROUP,
                            f"unknown group `{token}`",
                            where=f"{where}[{j}]",
                            hint=suggest(token, names)
                            or f"token_specs has {', '.join(names) or 'no groups'}",
                        )
                    )
            sides.append(tuple(t for t in tokens if t in seen))
        keys = tuple(KeyGroup(name) for name in dict.fromkeys(sides[1]))
        rules.append(ResolvedRule(tuple(dict.fromkeys(sides[0])), keys, where=f"attention_patterns[{i}]"))
    inputs = list(dict.fromkeys(s.name for s in specs if s.size is not None))
    diagnostics.extend(check_rules("attention_patterns", inputs, rules, where="attention_patterns"))
    if diagnostics:
        raise PatternError(diagnostics)
