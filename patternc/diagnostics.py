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

__all__ = [
    "MEANINGS",
    "RESERVED_WORDS",
    "Code",
    "Diagnostic",
    "PatternError",
    "Span",
    "closest",
    "diagnostics_json",
    "errors_only",
    "render",
    "suggest",
]


RESERVED_WORDS = ("groups", "pattern", "types", "self")
"""Words of the language: never group names, never proposed by a hint."""


class Code:
    """Stable diagnostic codes, one meaning each (:data:`MEANINGS`; the table
    in docs/language.md lists the same). Tools and tests match on codes,
    never on text. ``E`` codes are errors, ``W`` codes warnings."""

    # reading the input
    UNREADABLE = "E001"
    NOT_TEXT = "E002"
    TOO_LARGE = "E003"
    EMPTY_FILE = "E004"
    TOO_DEEP = "E005"
    PATH_AS_TEXT = "E006"
    TOO_MANY_RULES = "E007"
    TOO_MANY_NAMES = "E008"
    # syntax
    SYNTAX = "E010"
    BAD_NAME = "E011"
    RESERVED_NAME = "E012"
    # modifiers
    UNKNOWN_MODIFIER = "E020"
    BAD_MODIFIER_ARGUMENT = "E021"
    DUPLICATE_MODIFIER = "E022"
    CONFLICTING_MODIFIERS = "E023"
    MISPLACED_MODIFIER = "E024"
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
    MISPLACED_SELF = "E204"
    # pattern structure
    NOT_EXHAUSTIVE = "E301"
    OVERLAP = "E302"
    NO_PATTERNS = "E303"
    EMPTY_SIDE = "E304"
    REPEATED_IN_LIST = "E305"
    # run-time groups and sizes
    SIZE_FOR_UNKNOWN_GROUP = "E401"
    BAD_SIZE = "E402"
    MISSING_SIZE = "E403"
    WRONG_GROUP_ORDER = "E404"
    NOT_A_MEMBER = "E405"
    EMPTY_FAMILY = "E406"
    # warnings
    NEVER_A_KEY = "W101"
    RULE_MODIFIER_ACROSS_GROUPS = "W102"
    FULL_ATTENTION = "W103"


MEANINGS: dict[str, str] = {
    Code.UNREADABLE: "the file cannot be read (missing, a directory, no permission)",
    Code.NOT_TEXT: "the file is not UTF-8 text (binary or another encoding)",
    Code.TOO_LARGE: "the file is larger than 4 MiB",
    Code.EMPTY_FILE: "the file is empty",
    Code.TOO_DEEP: "selectors nested too deeply (more than 64 parentheses)",
    Code.PATH_AS_TEXT: "`patternc.compile` got a `str` that names a file: pass a `Path`",
    Code.TOO_MANY_RULES: "more rules than a file may hold (5,000)",
    Code.TOO_MANY_NAMES: "more names (groups, globs, modifier words) than a file may hold (20,000)",
    Code.SYNTAX: "syntax error: what was found and what was expected",
    Code.BAD_NAME: "not a valid group, pattern or type name",
    Code.RESERVED_NAME: "a reserved word (`groups`, `pattern`, `types`, `self`) used as a name",
    Code.UNKNOWN_MODIFIER: "unknown modifier",
    Code.BAD_MODIFIER_ARGUMENT: "a bad modifier argument (`causal 3`, `window`, `window -3`, `window 1.5`)",
    Code.DUPLICATE_MODIFIER: "a modifier given twice in a list (`[causal, causal]`, `[window 4, window 8]`)",
    Code.CONFLICTING_MODIFIERS: "two modifier lists for one key group (the rule's and a key's, or two keys')",
    Code.MISPLACED_MODIFIER: "modifiers where they mean nothing (query side, an exclusion, `types`)",
    Code.DUPLICATE_GROUP: "a group declared twice",
    Code.NO_GROUPS: "no `groups` declaration",
    Code.DUPLICATE_PATTERN: "a pattern name used twice",
    Code.NO_RULES: "groups but no rules",
    Code.EMPTY_PATTERN: "a pattern block with no rules",
    Code.MIXED_TOP_LEVEL: "rules outside a block in a file with named patterns",
    Code.DUPLICATE_TYPE: "a group given two types in the `types` block",
    Code.UNKNOWN_GROUP: 'unknown group (with "did you mean")',
    Code.GLOB_MATCHES_NOTHING: "a glob that matches no group",
    Code.EMPTY_SELECTOR: "a selector that ends up selecting nothing (e.g. `a - a`)",
    Code.MISPLACED_SELF: "`self` used other than as the whole key side of a rule",
    Code.NOT_EXHAUSTIVE: "groups that are a query in no rule of a pattern (all listed in one diagnostic)",
    Code.OVERLAP: "a group that is a query in two rules (overlap; both places named)",
    Code.NO_PATTERNS: "(hand-written lists) no patterns given",
    Code.EMPTY_SIDE: "(hand-written lists) an empty `query_tokens` or `key_value_tokens`",
    Code.REPEATED_IN_LIST: "(hand-written lists) a group listed twice in one side of a pattern",
    Code.SIZE_FOR_UNKNOWN_GROUP: "(sizes) a size given for a group the plan does not have",
    Code.BAD_SIZE: "(sizes) a size that is not an integer >= 0 or None",
    Code.MISSING_SIZE: "(sizes) groups without a size",
    Code.WRONG_GROUP_ORDER: "(token specs) groups not in the plan's order",
    Code.NOT_A_MEMBER: "(sizes) a run-time group that is neither declared nor a member of a family",
    Code.EMPTY_FAMILY: "(sizes) a rule whose only keys are families with no members in this input",
    Code.NEVER_A_KEY: "warning: a group that no rule of any pattern lets anyone attend to",
    Code.RULE_MODIFIER_ACROSS_GROUPS: "warning: a rule-level modifier over several key groups",
    Code.FULL_ATTENTION: "warning: a pattern that is plain full attention (every group to every group)",
}
"""What each code means: the one place the table in docs/language.md follows."""


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
    def severity(self) -> str:
        """``error`` or ``warning`` (``W`` codes)."""
        return "warning" if self.code.startswith("W") else "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_dict(self, filename: str | None = None) -> dict[str, object]:
        """JSON-ready, as ``--output-format json`` prints it (lines and columns
        from 1; the end column is exclusive)."""
        span = self.span
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "file": filename if span is not None or self.where is None else self.where,
            "where": self.where,
            "start": {"line": span.line, "column": span.column} if span else None,
            "end": {"line": span.end_line, "column": span.end_column} if span else None,
            "hint": self.hint,
        }

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt name most likely meant, or None (never a reserved word)."""
    pool = [c for c in candidates if c not in RESERVED_WORDS]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt name, or None if nothing is close."""
    match = closest(name, candidates)
    return f"did you mean `{match}`?" if match else None


def _caret_lines(source_line: str, span: Span) -> list[str]:
    text = source_line.rstrip("\r\n").expandtabs(1)
    width = span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
    width = max(1, min(width, max(1, len(text) - span.column + 1)))
    pad = " " * (span.column - 1)
    return [f"    {text}", f"    {pad}^{'~' * (width - 1)}"]


def render(
    diagnostics: Sequence[Diagnostic], *, filename: str | None = None, source: str | None = None
) -> str:
    """Render diagnostics as ``file:line:col: error[CODE]: message`` blocks
    (``warning[W...]`` for warnings). Lines split at ``\\n`` only, as the parser counts them."""
    lines = [line.removesuffix("\r") for line in source.split("\n")] if source is not None else []
    blocks: list[str] = []
    for diag in diagnostics:
        where = diag.where or filename or "<input>"
        if diag.span is not None:
            where = f"{filename or '<input>'}:{diag.span.line}:{diag.span.column}"
        out = [f"{where}: {diag.severity}[{diag.code}]: {diag.message}"]
        if diag.span is not None and 0 < diag.span.line <= len(lines):
            out.extend(_caret_lines(lines[diag.span.line - 1], diag.span))
        if diag.hint:
            out.append(f"  hint: {diag.hint}")
        blocks.append("\n".join(out))
    errors = sum(1 for d in diagnostics if d.is_error)
    warnings = len(diagnostics) - errors
    if len(diagnostics) > 1:
        counts = [f"{errors} error{'s' * (errors != 1)}"] if errors else []
        counts += [f"{warnings} warning{'s' * (warnings != 1)}"] if warnings else []
        blocks.append(", ".join(counts))
    return "\n".join(blocks)


def errors_only(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diagnostics if d.is_error]


def diagnostics_json(
    diagnostics: Iterable[Diagnostic], filename: str | None = None
) -> list[dict[str, object]]:
    """Diagnostics as a JSON-ready list (``--output-format json``)."""
    return [d.to_dict(filename) for d in diagnostics]


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
        warnings: Sequence[Diagnostic] = (),
    ) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        self.warnings: tuple[Diagnostic, ...] = tuple(warnings)
        """Warnings found beside the errors (also in ``diagnostics``)."""
        self.filename = filename
        self.source = source
        super().__init__(render(self.diagnostics, filename=filename, source=source))
