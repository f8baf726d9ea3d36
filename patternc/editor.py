"""What an editor asks of a pattern file, answered from the compiler alone.

Pure functions of the file's text (no pygls, no torch), so the language
server (:mod:`patternc.lsp`) is only wiring and these are tested directly.
Lines and columns are 1-based, as in the compiler's diagnostics.

- :func:`check`: every diagnostic of the file (errors and warnings);
- :func:`completions`: group names, families, modifiers and keywords;
- :func:`hover`: the rules a group is in (and its size when known);
- :func:`declaration`: where a group is declared;
- :func:`formatting`: the edits ``patternc fmt`` would make;
- :func:`code_actions`: quick fixes for the diagnostics on some lines.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from patternc.compiler import compile_text
from patternc.diagnostics import Diagnostic, PatternError
from patternc.members import MEMBER_RELATION_DOCS
from patternc.modifiers import MODIFIER_NAMES
from patternc.plan import Program
from patternc.project import Settings
from patternc.syntax import parse

_MODIFIER_DETAIL = {
    "causal": "causal: j <= i",
    "window": "window N: |i - j| < N",
    "back": "back L: i - j <= L",
    "ahead": "ahead R: j - i <= R",
    "dilate": "dilate D: every D-th key, (j - i) % D == 0",
    "across": "across: positions in the whole input, not within each group",
}

__all__ = [
    "CodeAction",
    "Completion",
    "Location",
    "TextEdit",
    "check",
    "code_actions",
    "completions",
    "declaration",
    "formatting",
    "hover",
    "word_at",
]

KEYWORDS = ("groups", "pattern", "types", "self")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\*(?:_\*)*)?"
"""A group, a family (``doc*``) or a grid family (``tile*_*``)."""
_WORD = re.compile(_NAME + r"(?:\." + _NAME + ")?")
"""A name under the cursor, a family's part included (``run*.text``)."""
_DECLARED = re.compile(_NAME + r"|[{}]")


@dataclass(frozen=True, slots=True)
class Completion:
    label: str
    kind: str
    """``group``, ``family``, ``modifier`` or ``keyword``."""
    detail: str


@dataclass(frozen=True, slots=True)
class Location:
    line: int
    column: int
    end_column: int


def _program(text: str) -> Program | None:
    try:
        return compile_text(text, None)
    except PatternError:
        return None


def check(text: str, filename: str | None = None, settings: Settings | None = None) -> list[Diagnostic]:
    """Every problem of the file, errors and warnings, as ``patternc check``
    reports them (the warnings ``settings`` selects, when given)."""
    try:
        found = list(compile_text(text, filename).warnings)
    except PatternError as error:
        found = list(error.diagnostics)
    return settings.filter(found) if settings is not None else found


def declared_groups(text: str) -> dict[str, Location]:
    """Groups of the ``groups`` lines and where each is declared (works on
    files with errors); a family's parts on its line are ``doc*.prefix``."""
    out: dict[str, Location] = {}
    previous = ""
    family = None
    for number, line in enumerate(text.splitlines(), start=1):
        code = line.split("#", 1)[0]
        stripped = code.lstrip()
        if family is not None and ("->" in code or stripped.startswith(("groups", "pattern", "types"))):
            family = None  # a `{` left open: this line is a statement of its own
        if family is not None:  # a list of parts that goes on over lines
            offset = 0
        elif stripped.startswith("groups"):
            offset = len(code) - len(stripped) + len("groups")
        else:
            continue
        for match in _DECLARED.finditer(code, offset):
            if match.group() == "{":
                family = previous
            elif match.group() == "}":
                family = None
            else:
                previous = match.group()
                name = f"{family}.{previous}" if family else previous
                if family is None and code[match.end() :].lstrip().startswith("{"):
                    continue  # a family with parts: its parts are the groups
                out.setdefault(name, Location(number, match.start() + 1, match.end() + 1))
    return out


def word_at(text: str, line: int, column: int) -> str | None:
    """The name under the cursor (1-based line and column), ``doc*`` included."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return None
    for match in _WORD.finditer(lines[line - 1]):
        if match.start() < column <= match.end() + 1:
            return match.group()
    return None


def completions(text: str, line: int, column: int) -> list[Completion]:
    """Names to offer at the cursor: modifiers inside ``[...]``, else groups,
    families and keywords."""
    lines = text.splitlines()
    before = lines[line - 1][: column - 1] if 1 <= line <= len(lines) else ""
    if before.count("[") > before.count("]"):
        return [Completion(m, "modifier", _MODIFIER_DETAIL[m]) for m in MODIFIER_NAMES] + [
            Completion(name, "member relation", doc) for name, doc in MEMBER_RELATION_DOCS.items()
        ]
    groups = declared_groups(text)
    out = [
        Completion(name, "family" if "*" in name else "group", f"declared on line {loc.line}")
        for name, loc in groups.items()
    ]
    out += [Completion(k, "keyword", "keyword") for k in KEYWORDS]
    return out


def declaration(text: str, line: int, column: int) -> Location | None:
    """Where the group under the cursor is declared (None: not a declared group)."""
    word = word_at(text, line, column)
    if word is None:
        return None
    groups = declared_groups(text)
    return groups.get(word) or groups.get(word + "*")


def _shapes(text: str) -> dict[str, tuple[int, ...]]:
    """Groups declared with a shape (``image[16, 16]``) and their shapes."""
    try:
        groups = parse(text).groups
    except PatternError:
        return {}
    return {g.name: g.shape for g in groups if g.shape}


def hover(text: str, line: int, column: int, sizes: Mapping[str, int] | None = None) -> str | None:
    """Markdown for the group under the cursor: the rules it is a query and a
    key in, per pattern, and its size when ``sizes`` (editor settings) has it."""
    word = word_at(text, line, column)
    declared = declared_groups(text)
    if word is None:
        return None
    lines_of = text.splitlines()
    before = lines_of[line - 1][: column - 1]
    if before.count("[") > before.count("]") and not before.lstrip().startswith("groups"):
        # a word of a modifier list: what it means
        meaning = _MODIFIER_DETAIL.get(word) or MEMBER_RELATION_DOCS.get(word)
        if meaning is not None:
            return f"**{word}**: {meaning.split(': ', 1)[1]}"
    # a family with parts is its parts (`run*`: `run*.text`, `run*.image`)
    parts = [g for g in declared if "." in g and g.split(".", 1)[0] == word]
    if word.rstrip("*") not in {g.rstrip("*") for g in declared} and not parts:
        return None
    shown = word.replace("*", "\\*")  # a `*` in markdown's bold would end it
    lines = [f"**{shown}**" + (f": {sizes[word]} tokens" if sizes and word in sizes else "")]
    shape = _shapes(text).get(word)
    if shape:
        lines[0] += f" (shape {list(shape)}: {math.prod(shape)} tokens, row-major)"
    if parts:
        lines[0] += ": a family with the parts " + ", ".join(f"`{p.split('.', 1)[1]}`" for p in parts)
    names = set(parts) or {word}
    program = _program(text)
    if program is None:
        lines.append("(the file has errors: fix them to see its rules)")
        return "\n\n".join(lines)
    for name, plan in program.patterns.items():
        queries = [r for r in plan.rules if names & set(r.queries)]
        keys = [r for r in plan.rules if names & set(r.keys_values)]
        if not queries and not keys:
            continue
        parts = [f"pattern `{name}`"]
        parts += [f"- query in `{r.text or r.location()}` ({r.location()})" for r in queries]
        parts += [f"- key of `{r.text or r.location()}` ({r.location()})" for r in keys]
        lines.append("\n".join(parts))
    return "\n\n".join(lines)


@dataclass(frozen=True, slots=True)
class TextEdit:
    """Replace from (``line``, ``column``) up to (``end_line``, ``end_column``),
    exclusive, by ``text``; 1-based, in characters of the source text."""

    line: int
    column: int
    end_line: int
    end_column: int
    text: str


@dataclass(frozen=True, slots=True)
class CodeAction:
    """A quick fix: ``edits`` applied together resolve ``diagnostic``."""

    title: str
    edits: tuple[TextEdit, ...]
    diagnostic: Diagnostic
    preferred: bool
    """The fix itself (as against silencing a warning)."""


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset (lines end at ``\\n``)."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def formatting(text: str, filename: str | None = None) -> list[TextEdit] | None:
    """The edits that turn ``text`` into what ``patternc fmt`` writes, one per
    run of changed lines (so an editor keeps the cursor and folds elsewhere);
    ``[]`` when it is formatted, None when it has errors (a file that does not
    compile is not reformatted)."""
    from patternc.fmt import format_source

    try:
        formatted = format_source(text, filename)
    except PatternError:
        return None
    old, new = text.splitlines(keepends=True), formatted.splitlines(keepends=True)
    starts = [0]
    for line in old:
        starts.append(starts[-1] + len(line))
    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            start, end = _position(text, starts[i1]), _position(text, starts[i2])
            edits.append(TextEdit(*start, *end, "".join(new[j1:j2])))
    return edits


def _overlaps(diagnostic: Diagnostic, first: int, last: int) -> bool:
    span = diagnostic.span
    return span is not None and span.line <= last and span.end_line >= first


def _own_fix(diagnostic: Diagnostic) -> CodeAction | None:
    """The diagnostic's machine-applicable fix (its ``fix``: a title and edits
    of a ``span`` and a ``replacement`` each), when it carries one."""
    fix = getattr(diagnostic, "fix", None)
    if fix is None:
        return None
    edits = tuple(
        TextEdit(e.span.line, e.span.column, e.span.end_line, e.span.end_column, e.replacement)
        for e in fix.edits
    )
    return CodeAction(str(fix.title), edits, diagnostic, preferred=True)


_NOQA = re.compile(r"#\s*noqa(?::\s*[A-Za-z][0-9]{3}(?:\s*,\s*[A-Za-z][0-9]{3})*)?", re.IGNORECASE)


def _silence(diagnostic: Diagnostic, lines: list[str]) -> CodeAction | None:
    """For a warning: ``# noqa: CODE`` on the line it points at (added to the
    line's ``noqa`` list when it has one)."""
    span = diagnostic.span
    if diagnostic.is_error or span is None or not 1 <= span.line <= len(lines):
        return None
    line = lines[span.line - 1].removesuffix("\r")
    match = _NOQA.search(line)
    if match and ":" not in match.group():
        return None  # a bare noqa comment silences every warning already
    if match:
        at, text = match.end() + 1, f", {diagnostic.code}"
    else:
        at, text = len(line.rstrip()) + 1, f"  # noqa: {diagnostic.code}"
        if len(line.rstrip()) < len(line):  # replace trailing blanks
            edit = TextEdit(span.line, at, span.line, len(line) + 1, text)
            return CodeAction(f"silence {diagnostic.code} on this line", (edit,), diagnostic, False)
    edit = TextEdit(span.line, at, span.line, at, text)
    return CodeAction(f"silence {diagnostic.code} on this line", (edit,), diagnostic, preferred=False)


def code_actions(
    text: str,
    first_line: int,
    last_line: int | None = None,
    diagnostics: Iterable[Diagnostic] | None = None,
) -> list[CodeAction]:
    """Quick fixes for the diagnostics on lines ``first_line``..``last_line``
    (1-based, inclusive): each diagnostic's own fix (every "did you mean"
    rename, the merge of two rules for one group, the per-key form of a
    rule-level modifier) and, for a warning, ``# noqa`` on its line.
    ``diagnostics`` defaults to :func:`check` of ``text``."""
    last = first_line if last_line is None else last_line
    found = check(text) if diagnostics is None else list(diagnostics)
    lines = text.split("\n")
    out = []
    for diagnostic in found:
        if not _overlaps(diagnostic, first_line, last):
            continue
        for action in (_own_fix(diagnostic), _silence(diagnostic, lines)):
            if action is not None:
                out.append(action)
    return out
