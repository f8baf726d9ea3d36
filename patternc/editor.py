"""What an editor asks of a pattern file, answered from the compiler alone.

Pure functions of the file's text (no pygls, no torch), so the language
server (:mod:`patternc.lsp`) is only wiring and these are tested directly.
Lines and columns are 1-based, as in the compiler's diagnostics.

- :func:`check`: every diagnostic of the file (errors and warnings);
- :func:`completions`: group names, families, modifiers and keywords;
- :func:`hover`: the rules a group is in (and its size when known);
- :func:`declaration`: where a group is declared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from patternc.compiler import compile_text
from patternc.diagnostics import Diagnostic, PatternError
from patternc.modifiers import MODIFIER_NAMES
from patternc.plan import Program

__all__ = ["Completion", "Location", "check", "completions", "declaration", "hover", "word_at"]

KEYWORDS = ("groups", "pattern", "types", "self")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


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


def check(text: str, filename: str | None = None) -> list[Diagnostic]:
    """Every problem of the file, errors and warnings, as ``patternc check`` reports them."""
    try:
        program = compile_text(text, filename)
    except PatternError as error:
        return list(error.diagnostics)
    return list(program.warnings)


def declared_groups(text: str) -> dict[str, Location]:
    """Groups of the ``groups`` lines and where each is declared (works on files with errors)."""
    out: dict[str, Location] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        code = line.split("#", 1)[0]
        stripped = code.lstrip()
        if not stripped.startswith("groups"):
            continue
        offset = len(code) - len(stripped) + len("groups")
        for match in _WORD.finditer(code, offset):
            out.setdefault(match.group(), Location(number, match.start() + 1, match.end() + 1))
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
        return [
            Completion(m, "modifier", "causal: j <= i" if m == "causal" else "window N: |i - j| < N")
            for m in MODIFIER_NAMES
        ]
    groups = declared_groups(text)
    out = [
        Completion(name, "family" if name.endswith("*") else "group", f"declared on line {loc.line}")
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


def hover(text: str, line: int, column: int, sizes: Mapping[str, int] | None = None) -> str | None:
    """Markdown for the group under the cursor: the rules it is a query and a
    key in, per pattern, and its size when ``sizes`` (editor settings) has it."""
    word = word_at(text, line, column)
    if word is None or word.rstrip("*") not in {g.rstrip("*") for g in declared_groups(text)}:
        return None
    lines = [f"**{word}**" + (f": {sizes[word]} tokens" if sizes and word in sizes else "")]
    program = _program(text)
    if program is None:
        lines.append("(the file has errors: fix them to see its rules)")
        return "\n\n".join(lines)
    for name, plan in program.patterns.items():
        queries = [r for r in plan.rules if word in r.queries]
        keys = [r for r in plan.rules if word in r.keys_values]
        if not queries and not keys:
            continue
        parts = [f"pattern `{name}`"]
        parts += [f"- query in `{r.text or r.location()}` ({r.location()})" for r in queries]
        parts += [f"- key of `{r.text or r.location()}` ({r.location()})" for r in keys]
        lines.append("\n".join(parts))
    return "\n\n".join(lines)
