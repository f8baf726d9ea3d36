"""``patternc.compile``: pattern-file text -> checked :class:`Program`.

The pipeline, one stage per module: read (here) -> :mod:`patternc.syntax`
-> :mod:`patternc.resolve` -> :mod:`patternc.checks` and
:mod:`patternc.lint` -> :mod:`patternc.plan` (-> :mod:`patternc.lower.layout`
at run time). Each stage adds diagnostics; if any is an error the compile
raises one :class:`PatternError` that lists them all.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from patternc.checks import check_declarations, check_rules
from patternc.diagnostics import (
    Code,
    Diagnostic,
    NameIndex,
    PatternError,
    Span,
    errors_only,
    lines_at,
    rename_fix,
    suggest,
)
from patternc.ir import ResolvedRule
from patternc.lint import warn
from patternc.members import type_stem
from patternc.plan import Plan, Program
from patternc.resolve import SELF, GroupResolver, is_family
from patternc.schemas import domain_of
from patternc.syntax import (
    DEFAULT_PATTERN,
    GroupDecl,
    SourceFile,
    parse,
    pattern_blocks,
    selector_words,
    source_lines,
)

__all__ = [
    "DEFAULT_PATTERN",
    "MAX_NAMES",
    "MAX_NESTING",
    "MAX_RULES",
    "MAX_SOURCE_BYTES",
    "PatternTable",
    "UnknownPatternError",
    "compile",
    "read_source",
]

MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""Pattern files are small; anything larger is almost surely the wrong file."""
MAX_NESTING = 64
"""Parentheses a selector may nest (lists and exclusion chains are flat)."""
MAX_RULES = 5_000
MAX_NAMES = 20_000
"""Rules and names (groups, globs, modifier words) a file may hold: a model's
patterns are tens of rules (families stand for any number of groups), and at
these limits a file still compiles in well under a second. Each limit is
found by one linear scan before parsing, so even a 4 MiB file is refused at
once, at the place it is crossed."""

_COMMENT = re.compile(r"#[^\n]*")
_NAME = re.compile(r"[A-Za-z0-9_*?]+")


class UnknownPatternError(KeyError):
    """``program.patterns[name]`` for a pattern the file does not have; the
    message lists the patterns and the closest one."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __reduce__(self) -> tuple[object, ...]:
        return (UnknownPatternError, (self.name, self.known))

    def __str__(self) -> str:
        listed = ", ".join(f"`{k}`" for k in self.known[:20]) + (" ..." if len(self.known) > 20 else "")
        hint = suggest(self.name, self.known)
        return (
            f"no pattern `{self.name}`; " + (f"{hint} " if hint else "") + f"patterns: {listed or '(none)'}"
        )


class PatternTable(dict[str, Plan]):
    """``Program.patterns``: ``{name: Plan}`` in file order, whose missing
    name raises :class:`UnknownPatternError` (a ``KeyError``) naming the
    patterns and the closest one."""

    def __missing__(self, name: str) -> Plan:
        raise UnknownPatternError(name, tuple(self))


def read_source(path: str | os.PathLike[str]) -> str:
    """Read a pattern file as UTF-8 text, or raise a :class:`PatternError`
    saying why it cannot be one (missing, a directory, binary, too large...)."""
    name = os.fspath(path)

    def fail(code: str, message: str, hint: str | None = None, span: Span | None = None) -> PatternError:
        return PatternError([Diagnostic(code, message, span, hint, where=name)], filename=name)

    p = Path(name)
    try:
        if p.is_dir():
            raise fail(Code.UNREADABLE, f"`{name}` is a directory, not a pattern file", "pass a `.pc` file")
        size = p.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise fail(
                Code.TOO_LARGE,
                f"`{name}` is {size:,} bytes; pattern files are limited to {MAX_SOURCE_BYTES:,}",
                "is this the right file?",
            )
        data = p.read_bytes()
    except FileNotFoundError:
        raise fail(Code.UNREADABLE, f"cannot read `{name}`: no such file") from None
    except PermissionError:
        raise fail(Code.UNREADABLE, f"cannot read `{name}`: permission denied") from None
    except OSError as error:
        raise fail(Code.UNREADABLE, f"cannot read `{name}`: {error.strerror or error}") from None
    if b"\x00" in data:
        raise fail(
            Code.NOT_TEXT, f"`{name}` looks like a binary file (it holds NUL bytes)", "pass a text `.pc` file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise fail(
            Code.NOT_TEXT,
            f"`{name}` is not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, column {column})",
            "save the file as UTF-8",
        ) from None
    return text.removeprefix("\ufeff")


def compile(source: str | os.PathLike[str], *, filename: str | None = None) -> Program:  # noqa: A001
    """Compile pattern-file text, or the file at a ``Path``, into a :class:`Program`.

    >>> program = compile('''
    ... groups surface_anchors surface_queries
    ... surface_* -> surface_anchors
    ... ''')
    >>> program.patterns["default"].attention_patterns[0].key_value_tokens
    ('surface_anchors',)

    A ``str`` is always pattern text: one that names a file (``"model.pc"``)
    is refused (E006) with a hint to pass ``pathlib.Path("model.pc")``, since
    reading it as text would report a confusing syntax error. Raises
    :class:`PatternError` listing every problem (``.diagnostics``); warnings
    are on the result (``program.warnings``).
    """
    if isinstance(source, os.PathLike):
        filename = filename or os.fspath(source)
        text = read_source(source)
    else:
        _refuse_path_text(source)
        text = source
    return compile_text(text, filename)


def _refuse_path_text(text: str) -> None:
    candidate = text.strip()
    if not candidate or "\n" in candidate or len(candidate) > 4096:
        return
    looks_like_file = candidate.endswith((".patc", ".pc"))
    if not looks_like_file:
        try:
            looks_like_file = Path(candidate).is_file()
        except (OSError, ValueError):
            return
    if looks_like_file:
        raise PatternError(
            [
                Diagnostic(
                    Code.PATH_AS_TEXT,
                    f"patternc.compile got the str {candidate!r}, which names a file; a str is read as "
                    "pattern text",
                    None,
                    f"pass a path: patternc.compile(pathlib.Path({candidate!r}))",
                    where="<input>",
                )
            ]
        )


def compile_text(text: str, filename: str | None) -> Program:
    """Compile pattern text; errors raise :class:`PatternError` (warnings
    included in its diagnostics), warnings alone land on the program."""
    if not text.strip():
        raise PatternError(
            [
                Diagnostic(
                    Code.EMPTY_FILE,
                    "the pattern file is empty",
                    None,
                    "start with `groups NAME ...` and add rules such as `* -> *`",
                    where=filename or "<input>",
                )
            ],
            filename=filename,
            source=text,
        )
    limit = _over_limits(text)
    if limit is not None:
        raise PatternError([limit], filename=filename, source=text)
    try:
        program, diagnostics = _lower(parse(text), filename, text)
    except RecursionError:
        raise PatternError(
            [Diagnostic(Code.TOO_DEEP, "selectors are nested too deeply", None, where=filename or "<input>")],
            filename=filename,
        ) from None
    errors = errors_only(diagnostics)
    if errors:
        warnings = [d for d in diagnostics if not d.is_error]
        raise PatternError(diagnostics, filename=filename, source=text, warnings=warnings)
    assert program is not None
    return replace(program, warnings=tuple(diagnostics))


def _position(text: str, offset: int) -> Span:
    line = text.count("\n", 0, offset) + 1
    return Span.point(line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


def _over_limits(text: str) -> Diagnostic | None:
    """The first limit the text crosses (nesting, rules, names), found in
    linear scans of the text without comments (blanked: offsets stay)."""
    code = _COMMENT.sub(lambda m: " " * len(m.group()), text)
    depth = 0
    for paren in re.finditer("[()]", code):
        offset, char = paren.start(), paren.group()
        if char == "(":
            depth += 1
            if depth > MAX_NESTING:
                return Diagnostic(
                    Code.TOO_DEEP,
                    f"selectors are nested more than {MAX_NESTING} parentheses deep",
                    _position(text, offset),
                    "flatten the selector: `a, b, c` and `a - b - c` need no parentheses",
                )
        elif char == ")":
            depth = max(0, depth - 1)
    arrows = [m.start() for m in re.finditer("->", code)]
    if len(arrows) > MAX_RULES:
        return Diagnostic(
            Code.TOO_MANY_RULES,
            f"the file has {len(arrows):,} rules; at most {MAX_RULES:,} are allowed",
            _position(text, arrows[MAX_RULES]),
            "a family (`groups doc*` with `doc* -> self`) stands for any number of groups",
        )
    for count, match in enumerate(_NAME.finditer(code), 1):
        if count > MAX_NAMES:
            return Diagnostic(
                Code.TOO_MANY_NAMES,
                f"the file holds more than {MAX_NAMES:,} names",
                _position(text, match.start()),
                "declare a family (`groups doc*`) instead of many groups, and select with globs",
            )
    return None


def _lower(syntax: SourceFile, filename: str | None, text: str) -> tuple[Program | None, list[Diagnostic]]:
    diagnostics = list(syntax.diagnostics)
    if 0 in syntax.skipped_lines:  # recovery gave up: the syntax errors are all we know
        return None, diagnostics
    skipped = syntax.skipped_lines
    diagnostics.extend(check_declarations(syntax, complete=not skipped))
    declared = tuple(dict.fromkeys(g.name for g in syntax.groups))
    # a misspelt declaration is one error at its place; the rest of the file
    # is checked as if it were spelt as the rules spell it
    maybe_declared = _maybe_declared(text, skipped)
    typos = _declaration_typos(syntax, declared, maybe_declared)
    diagnostics.extend(diagnostic for _, diagnostic in typos.values())
    groups = tuple(typos[g][0] if g in typos else g for g in declared)
    group_spans = {typos[g.name][0] if g.name in typos else g.name: g.span for g in reversed(syntax.groups)}
    shapes = {g.name: g.shape for g in syntax.groups if g.shape}
    unshaped = frozenset(g.name for g in syntax.groups if g.bad_shape)
    resolver = GroupResolver(groups, maybe_declared=maybe_declared, shapes=shapes, bad_shapes=unshaped)
    group_types, problems = _resolve_types(syntax, resolver)
    diagnostics.extend(problems)
    plans = PatternTable()
    line_text = _line_reader(text)
    for block in pattern_blocks(syntax):
        rules: list[ResolvedRule] = []
        intended: set[str] = set()
        for rule in block.rules:
            resolution = resolver.rule(rule)
            diagnostics.extend(resolution.diagnostics)
            intended |= resolution.intended_queries
            rules.extend(resolution.rules)
        # a rule left out after a syntax error may have been any group's rule
        block_lost_rules = any(block.span.line <= line <= block.span.end_line for line in skipped)
        if block.rules and groups and not block_lost_rules and not (skipped and block.name_span is None):
            diagnostics.extend(
                check_rules(
                    block.name,
                    groups,
                    rules,
                    pattern_span=block.name_span,
                    group_spans=group_spans,
                    already_reported=intended,
                    line_text=line_text,
                )
            )
        plans.setdefault(block.name, Plan(block.name, groups, tuple(rules), group_types))
    diagnostics.extend(_suppress(warn(syntax, plans, errors_only(diagnostics)), syntax))
    diagnostics.sort(key=lambda d: ((d.span.line, d.span.column) if d.span else (0, 0), d.code))
    return Program(filename, groups, plans, dict(zip(groups, group_types))), diagnostics


def _line_reader(text: str) -> Callable[[int], str | None]:
    """Source lines by number (None past the end), split only if asked."""
    lines: list[str] = []

    def line_text(number: int) -> str | None:
        if not lines:
            lines.extend(source_lines(text))
        return lines[number - 1] if 0 < number <= len(lines) else None

    return line_text


def _maybe_declared(text: str, skipped: frozenset[int]) -> frozenset[str]:
    """Names on lines left out after a syntax error that hold no rule: they
    may be declarations (``gruops a b``), so rules naming them are not
    reported unknown as well."""
    if not skipped:
        return frozenset()
    lines = lines_at(text, skipped)
    return frozenset(
        name for line in lines.values() if "->" not in line for name in _NAME.findall(line.split("#", 1)[0])
    )


def _declaration_typos(
    syntax: SourceFile, declared: tuple[str, ...], maybe_declared: frozenset[str]
) -> dict[str, tuple[str, Diagnostic]]:
    """``{declared: (meant, diagnostic)}`` for declarations that look
    misspelt: rules name an undeclared group at least twice, and the declared
    group closest to it is named by no rule (``groups surfce_queries`` with
    ``surface_queries`` in three rules). Reported once, at the declaration."""
    words = [w for block in pattern_blocks(syntax) for rule in block.rules
             for side in (rule.queries, rule.keys_values) for w in selector_words(side)]  # fmt: skip
    words += [w for rule in syntax.types for w in selector_words(rule.selector)]
    named = Counter(w.text for w in words if not w.is_glob and w.text != SELF)
    known = set(declared)
    unknown = [
        name
        for name, count in named.items()
        if count >= 2 and name not in known and name not in maybe_declared
    ]
    if not unknown:
        return {}
    spans = {g.name: g for g in reversed(syntax.groups)}
    every = NameIndex(declared)
    typos: dict[str, tuple[str, Diagnostic]] = {}
    for name in unknown:
        meant = every.closest(name)
        if meant is None or meant in named or meant in typos or is_family(meant):
            continue
        decl: GroupDecl = spans[meant]
        typos[meant] = (
            name,
            Diagnostic(
                Code.UNKNOWN_GROUP,
                f"group `{meant}` is declared, but the rules name `{name}` ({named[name]} times)",
                decl.span,
                f"did you mean `{name}`? the declaration looks misspelt",
                fix=rename_fix(decl.span, meant, name),
            ),
        )
    return typos


def _suppress(warnings: list[Diagnostic], syntax: SourceFile) -> list[Diagnostic]:
    """Drop warnings silenced by a ``# noqa`` (or ``# noqa: W101``) on their line."""
    silenced = dict(syntax.suppressed)
    kept = []
    for d in warnings:
        codes = silenced.get(d.span.line) if d.span is not None else None
        if codes is not None and (not codes or d.code in codes):
            continue
        kept.append(d)
    return kept


def _resolve_types(syntax: SourceFile, resolver: GroupResolver) -> tuple[tuple[str, ...], list[Diagnostic]]:
    """Type of every group: from the ``types`` block, else the group's domain."""
    diagnostics: list[Diagnostic] = []
    assigned: dict[str, tuple[str, int]] = {}
    for rule in syntax.types:
        selected, problems = resolver.select(rule.selector, f"type `{rule.type_name}`")
        diagnostics.extend(problems)
        for group in selected:
            if group in assigned:
                first, line = assigned[group]
                diagnostics.append(
                    Diagnostic(
                        Code.DUPLICATE_TYPE,
                        f"group `{group}` is given two types: `{first}` (line {line}) and `{rule.type_name}`",
                        rule.span,
                        "each group uses one weight bank; narrow one of the selectors",
                    )
                )
            else:
                assigned[group] = (rule.type_name, rule.span.line)
    types = tuple(assigned[g][0] if g in assigned else domain_of(type_stem(g)) for g in resolver.groups)
    return types, diagnostics
