"""Diagnostics: what went wrong, where, and how to fix it.

Every stage reports problems as :class:`Diagnostic` values instead of raising
on the first one, so a user sees all problems of a file in one run. A
:class:`PatternError` carries the list and renders it like a compiler would::

    examples/bad.pc:3:5: error[E201]: unknown group `volume_anchor`
        volume_* -> volume_anchor
                    ^~~~~~~~~~~~~
      hint: did you mean `volume_anchors`?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Code", "Diagnostic", "PatternError", "Span", "render", "suggest"]


class Code:
    """Stable diagnostic codes. Tools and tests match on these, never on text."""

    # reading the input
    UNREADABLE = "E001"
    NOT_TEXT = "E002"
    TOO_LARGE = "E003"
    EMPTY_FILE = "E004"
    TOO_DEEP = "E005"
    # syntax
    SYNTAX = "E010"
    BAD_NAME = "E011"
    BAD_MODIFIER = "E012"
    # declarations
    DUPLICATE_GROUP = "E101"
    NO_GROUPS = "E102"
    DUPLICATE_PATTERN = "E103"
    NO_RULES = "E104"
    EMPTY_PATTERN = "E105"
    MIXED_TOP_LEVEL = "E106"
    DUPLICATE_TYPE = "E107"
    # selectors
    UNKNOWN_GROUP = "E201"
    GLOB_MATCHES_NOTHING = "E202"
    EMPTY_SELECTOR = "E203"
    # pattern structure
    NOT_EXHAUSTIVE = "E301"
    OVERLAP = "E302"
    NO_PATTERNS = "E303"
    EMPTY_SIDE = "E304"


@dataclass(frozen=True, slots=True)
class Span:
    """A region of source text; lines and columns count from 1."""

    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def point(line: int, column: int, width: int = 1) -> Span:
        return Span(line, column, line, column + max(width, 1))


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem. ``span`` is None for problems outside any source text
    (e.g. a hand-written pattern list); ``where`` then names the place."""

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    where: str | None = None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt name, or None if nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def _caret_lines(source_line: str, span: Span) -> list[str]:
    text = source_line.rstrip("\r\n").expandtabs(1)
    width = span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
    width = max(1, min(width, max(1, len(text) - span.column + 1)))
    pad = " " * (span.column - 1)
    return [f"    {text}", f"    {pad}^{'~' * (width - 1)}"]


def render(
    diagnostics: Sequence[Diagnostic], *, filename: str | None = None, source: str | None = None
) -> str:
    """Render diagnostics as ``file:line:col: error[CODE]: message`` blocks."""
    lines = source.splitlines() if source is not None else []
    blocks: list[str] = []
    for diag in diagnostics:
        where = diag.where or filename or "<input>"
        if diag.span is not None:
            where = f"{filename or '<input>'}:{diag.span.line}:{diag.span.column}"
        out = [f"{where}: error[{diag.code}]: {diag.message}"]
        if diag.span is not None and 0 < diag.span.line <= len(lines):
            out.extend(_caret_lines(lines[diag.span.line - 1], diag.span))
        if diag.hint:
            out.append(f"  hint: {diag.hint}")
        blocks.append("\n".join(out))
    count = len(diagnostics)
    if count > 1:
        blocks.append(f"{count} errors")
    return "\n".join(blocks)


class PatternError(ValueError):
    """Raised when a pattern file or pattern list has problems.

    ``diagnostics`` lists every problem found (not just the first); ``str()``
    renders them as the ``patternc`` command line does.
    """

    def __init__(
        self,
        diagnostics: Sequence[Diagnostic],
        *,
        filename: str | None = None,
        source: str | None = None,
    ) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        self.filename = filename
        self.source = source
        super().__init__(render(self.diagnostics, filename=filename, source=source))
