"""Checks that a set of rules is a valid attention pattern.

The rule ``MixedAttention`` depends on: every input group is a query in
exactly one rule (exhaustive and non-overlapping). The same check serves
pattern files (``patternc.compile``) and hand-written ``AttentionPattern``
lists (:func:`check_patterns`), so both report the same codes and messages.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from patternc.diagnostics import Code, Diagnostic, Edit, Fix, PatternError, Span, suggest
from patternc.ir import KeyGroup, ResolvedRule
from patternc.modifiers import Modifiers
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
    line_text: Callable[[int], str | None] | None = None,
) -> list[Diagnostic]:
    """Every group of ``input_groups`` must be a query in exactly one rule.

    Groups that are not inputs (cached groups) may appear as queries; they are
    skipped at run time. Groups that are a query in no rule are one
    diagnostic listing them, except those in ``already_reported`` (what a
    misspelt query selector was meant to name: its own error says so).
    ``line_text`` (a source line by number, None past the end) lets an
    overlap's fix delete a merged rule's whole line.
    """
    diagnostics: list[Diagnostic] = []
    inputs = set(input_groups)
    owner: dict[str, ResolvedRule] = {}
    merges: dict[tuple[int, int], _Merge] = {}
    for rule in rules:
        for group in rule.queries:
            if group not in inputs:
                continue
            first = owner.setdefault(group, rule)
            if first is not rule:
                pair = (id(first), id(rule))
                if pair not in merges:  # one merge per pair of rules, whatever the groups they share
                    merges[pair] = _merge(first, rule, line_text)
                hint, fix = _overlap_hint(group, merges[pair])
                diagnostics.append(
                    Diagnostic(
                        Code.OVERLAP,
                        f"group `{group}` is a query in two rules of pattern `{pattern}`: "
                        f"{first.location()} (`{_short(first.text)}`) and {rule.location()} "
                        f"(`{_short(rule.text)}`)"
                        if first.text
                        else f"group `{group}` is a query in two patterns: "
                        f"{first.location()} and {rule.location()}",
                        rule.span,
                        hint,
                        where=rule.where,
                        fix=fix,
                    )
                )
    missing = [g for g in input_groups if g not in owner and g not in already_reported]
    if missing:
        span = pattern_span if pattern_span is not None else (group_spans or {}).get(missing[0])
        names = ", ".join(f"`{g}`" for g in missing[:_LISTED])
        names += f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
        example = ", ".join(missing[:_LISTED]) + (", ..." if len(missing) > _LISTED else "")
        diagnostics.append(
            Diagnostic(
                Code.NOT_EXHAUSTIVE,
                f"group {names} is a query in no rule of pattern `{pattern}`"
                if len(missing) == 1
                else f"{len(missing)} groups are a query in no rule of pattern `{pattern}`: {names}",
                span,
                f"every input group attends to something: add a rule such as `{example} -> ...`",
                where=where,
            )
        )
    return diagnostics


_LISTED = 20
"""Groups a message lists by name before counting the rest."""
_SHOWN_RULE = 60
"""Characters of a rule a message quotes."""
_MERGE_IN_HINT = 200
"""Longest merged rule a hint spells out (a fix carries any length up to ``_MERGE_IN_FIX``)."""
_MERGE_IN_FIX = 4000


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_RULE else text[: _SHOWN_RULE - 4].rstrip() + " ..."


@dataclass(frozen=True, slots=True)
class _Merge:
    """Two overlapping rules' keys in one list, each key with its modifiers
    (``keys``), or the key the rules give different modifiers (``clash``)."""

    keys: str
    clash: str | None
    fix: Fix | None


def _merge(
    first: ResolvedRule, second: ResolvedRule, line_text: Callable[[int], str | None] | None
) -> _Merge:
    merged: dict[str, Modifiers] = {}
    for key in (*first.keys, *second.keys):
        have = merged.setdefault(key.name, key.modifiers)
        if have != key.modifiers:
            clash = (
                f"the two rules give key `{key.name}` different modifiers "
                f"({have.text() or 'none'} and {key.modifiers.text() or 'none'})"
            )
            return _Merge("", clash, None)
    keys = ", ".join(f"{name}{mods.text()}" for name, mods in merged.items())
    return _Merge(keys, None, _merge_fix(first, second, keys, line_text))


def _overlap_hint(group: str, merge: _Merge) -> tuple[str, Fix | None]:
    """The hint and fix of an overlap: both rules' keys in one rule, each
    key with its own modifiers (``text -> image`` and ``text -> text
    [causal]`` merge into ``text -> image, text[causal]``), unless the rules
    give one key different modifiers."""
    if merge.clash is not None:
        return (
            f"a group's queries come from one rule, and {merge.clash}: choose one, "
            f"then merge the keys into one rule, or drop `{group}` from one",
            None,
        )
    keys = merge.keys
    shown = f" (`{group} -> {keys}`)" if keys and len(keys) <= _MERGE_IN_HINT else ""
    hint = (
        f"a group's queries come from one rule: merge the keys into one rule{shown} "
        f"or drop `{group}` from one"
    )
    return hint, merge.fix


def _merge_fix(
    first: ResolvedRule, second: ResolvedRule, keys: str, line_text: Callable[[int], str | None] | None
) -> Fix | None:
    """Two one-line rules with the same query groups become the first with
    both rules' keys; the second is deleted (with its line when alone on it)."""
    a, b = first.span, second.span
    if (
        a is None
        or b is None
        or line_text is None
        or first.to_self
        or second.to_self
        or first.queries != second.queries
        or a.line != a.end_line
        or b.line != b.end_line
        or a.line == b.line
        or len(keys) > _MERGE_IN_FIX
    ):
        return None
    merged = f"{', '.join(first.queries)} -> {keys}"
    line = line_text(b.line) or ""
    alone = not line[: b.column - 1].strip() and not line[b.end_column - 1 :].strip()
    if alone and line_text(b.line + 1) is not None:
        drop = Span(b.line, 1, b.line + 1, 1)
    elif alone and b.line > 1 and b.line - 1 != a.line:
        above = line_text(b.line - 1) or ""
        drop = Span(b.line - 1, len(above) + 1, b.line, len(line) + 1)
    else:
        drop = b
    return Fix(f"merge into `{_short(merged)}`", (Edit(a, merged), Edit(drop, "")))


def check_declarations(source: SourceFile, *, complete: bool = True) -> list[Diagnostic]:
    """Duplicate or missing groups, duplicate or empty patterns, stray rules.
    ``complete`` False: statements were left out after syntax errors, so
    nothing is reported missing (it may sit in a left-out line)."""
    diagnostics: list[Diagnostic] = []
    diagnostics.extend(_duplicates(source.groups, "group"))
    diagnostics.extend(_plain_and_with_parts(source.groups))
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


def _plain_and_with_parts(groups: Sequence[GroupDecl]) -> list[Diagnostic]:
    """``groups doc* doc*{a, b}``: one family declared both ways (its
    members could not tell which they are), reported at the later one."""
    plain = {g.name: g for g in groups if g.name.endswith("*") and "." not in g.name}
    parts: dict[str, list[GroupDecl]] = {}
    for group in groups:
        if "." in group.name:
            parts.setdefault(group.name.split(".", 1)[0], []).append(group)
    out = []
    for family, listed in parts.items():
        bare = plain.get(family)
        if bare is None:
            continue
        later = max(bare, listed[0], key=lambda g: (g.span.line, g.span.column))
        names = ", ".join(g.name.split(".", 1)[1] for g in listed)
        out.append(
            Diagnostic(
                Code.BAD_PARTS,
                f"`{family}` is declared both without parts (line {bare.span.line}) and with parts "
                f"(line {listed[0].span.line}): its members could not tell which they are",
                later.span,
                f"declare it once: `groups {family}{{{names}}}` (a member may have any of the parts)",
            )
        )
    return out


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
