"""Diagnostics: what went wrong, where, and how to fix it.

Every stage reports problems as :class:`Diagnostic` values instead of raising
on the first one, so a user sees all problems of a file in one run. A
:class:`PatternError` carries the list and renders it like a compiler would::

    examples/bad.pc:3:5: error[E201]: unknown group `volume_anchor`
        volume_* -> volume_anchor
                    ^~~~~~~~~~~~~
      hint: did you mean `volume_anchors`?

Rendering stays in proportion to the input (a window of a long line, a
count of what is not shown). Where a hint is a text edit, the diagnostic
also carries it as a :class:`Fix` that editors apply as a quick fix.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MEANINGS",
    "RESERVED_WORDS",
    "Code",
    "Diagnostic",
    "Edit",
    "Fix",
    "NameIndex",
    "PatternError",
    "Span",
    "closest",
    "diagnostics_json",
    "errors_only",
    "lines_at",
    "rename_fix",
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
    MISPLACED_MEMBER_RELATION = "E025"
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
    SELF_REPEATS_KEY = "E205"
    BAD_PARTS = "E206"
    MISPLACED_NOTHING = "E207"
    BAD_SHAPE = "E208"
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
    NO_MEMBER_KEYS = "E407"
    SAME_GRID_PLACE = "E408"
    SHAPE_SIZE = "E409"
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
    Code.BAD_MODIFIER_ARGUMENT: (
        "a bad modifier argument (`causal 3`, `window`, `window -3`, `window 1.5`, `back -1`, `dilate 0`, "
        "`across 2`)"
    ),
    Code.DUPLICATE_MODIFIER: (
        "a modifier given twice in a list (`[causal, causal]`, `[window 4, window 8]`, `[back 2, back 3]`)"
    ),
    Code.CONFLICTING_MODIFIERS: (
        "two modifier lists for one key group (the rule's and a key's, or two keys'), "
        "two relations for one key group (`f*[upto], f*[before]`), or `window` beside `back`/`ahead`"
    ),
    Code.MISPLACED_MODIFIER: "modifiers where they mean nothing (query side, an exclusion, `types`)",
    Code.MISPLACED_MEMBER_RELATION: (
        "`same`/`before`/`upto` on a key or with queries that are not families; `near`/`kernel` on a key "
        "that is neither a grid family nor a shaped group its queries share the shape of"
    ),
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
    Code.MISPLACED_SELF: "`self` used other than as a key of a rule (query side, an exclusion, `types`)",
    Code.SELF_REPEATS_KEY: "`self` beside keys that already select the query group itself",
    Code.MISPLACED_NOTHING: "`nothing` beside other keys or with modifiers (`a -> nothing` stands alone)",
    Code.BAD_PARTS: "a bad `{parts}` declaration (on a plain group or a grid, a part twice, a bad part name, "
    "a family declared both plain and with parts)",
    Code.BAD_SHAPE: "a bad shape declaration (`image[16, 16]`): on a family, or a size that is not a whole "
    "number >= 1",
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
    Code.NO_MEMBER_KEYS: "(sizes) a member that a member relation leaves with no keys (`frame*[before]`)",
    Code.SAME_GRID_PLACE: "(sizes) two members of a grid family at the same coordinates (`t0_1`, `t00_1`)",
    Code.SHAPE_SIZE: "(sizes) a group declared with a shape whose size is not the product of the shape",
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
class Edit:
    """Replace the text of ``span`` by ``replacement`` (an empty span inserts,
    an empty replacement deletes). Lines and columns count from 1 in
    characters of the source text (code points); the end column is exclusive."""

    span: Span
    replacement: str

    def to_dict(self) -> dict[str, object]:
        span = self.span
        return {
            "start": {"line": span.line, "column": span.column},
            "end": {"line": span.end_line, "column": span.end_column},
            "replacement": self.replacement,
        }


@dataclass(frozen=True, slots=True)
class Fix:
    """A machine-applicable fix: ``edits`` applied together (they never
    overlap) turn the source into the one the hint describes. ``title`` says
    what it does, for an editor's quick-fix menu (``rename `volume_anchor` to
    `volume_anchors```)."""

    title: str
    edits: tuple[Edit, ...]

    def to_dict(self) -> dict[str, object]:
        return {"title": self.title, "edits": [edit.to_dict() for edit in self.edits]}

    def apply(self, source: str) -> str:
        """``source`` with the edits made (lines split at ``\\n``, as the parser counts them)."""
        lines = source.split("\n")
        starts = [0]
        for line in lines[:-1]:
            starts.append(starts[-1] + len(line) + 1)

        def offset(line: int, column: int) -> int:
            if line > len(lines):
                return len(source)
            return min(starts[line - 1] + column - 1, len(source))

        out = source
        for edit in sorted(self.edits, key=lambda e: (e.span.line, e.span.column), reverse=True):
            start = offset(edit.span.line, edit.span.column)
            end = offset(edit.span.end_line, edit.span.end_column)
            out = out[:start] + edit.replacement + out[end:]
        return out


def count_tokens(count: int) -> str:
    """``1 token``, ``7 tokens``: a count of tokens as a message says it."""
    return f"{count} token" if count == 1 else f"{count} tokens"


def rename_fix(span: Span, old: str, new: str) -> Fix:
    """The fix of a "did you mean": replace ``old`` (at ``span``) by ``new``."""
    return Fix(f"replace `{old}` by `{new}`", (Edit(span, new),))


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem. ``span`` is None for problems outside any source text
    (e.g. a hand-written pattern list); ``where`` then names the place.

    ``fix`` is a machine-applicable form of the hint, or None: a
    :class:`Fix` whose ``edits`` (each a :class:`Edit`: a ``span`` and its
    ``replacement`` text) rewrite the source as the hint says. Every "did
    you mean" rename carries one, as do the merge of two rules for one query
    group (E302) and the per-key form of a rule-level modifier (W102);
    editors offer it as a quick fix and ``--output-format json`` prints it.
    """

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    where: str | None = None
    fix: Fix | None = None

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
            "fix": self.fix.to_dict() if self.fix is not None else None,
        }

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None


_SMALL_POOL = 200
"""Up to this many names, "did you mean" asks difflib about every one."""
_SHORTLIST = 24
"""Past it, difflib sees only this many: those sharing the most letter pairs."""
_POSTINGS_WORK = 4096
"""Index entries one question reads, past the first letter pair's."""
SUGGESTION_BUDGET = 200
"""Distinct misspelt names one :class:`NameIndex` (one file) answers; later
ones get no "did you mean", as a compiler stops after its first errors."""


def _bigrams(name: str) -> set[str]:
    padded = f"\x00{name}\x00"
    return {padded[i : i + 2] for i in range(len(padded) - 1)}


class NameIndex:
    """Answers "did you mean" against one set of names, cheaply at any size.

    difflib compares a name with every candidate; at thousands of names that
    is a pause per misspelt name. Past ``_SMALL_POOL`` names the index keeps
    the candidates that share the most letter pairs with the name and whose
    length difflib's cutoff allows (an index built once, at the first
    question), and runs difflib on those only. Answers are memoised; after
    ``budget`` distinct questions it answers None.
    """

    def __init__(self, names: Iterable[str], *, budget: int | None = SUGGESTION_BUDGET) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(n for n in names if n not in RESERVED_WORDS))
        self.budget = budget
        self._memo: dict[str, str | None] = {}
        self._postings: dict[str, list[int]] | None = None

    def closest(self, name: str) -> str | None:
        """The name ``name`` most likely meant, or None (never a reserved word)."""
        if name in self._memo:
            return self._memo[name]
        if self.budget is not None and len(self._memo) >= self.budget:
            return None
        pool = self.names if len(self.names) <= _SMALL_POOL else self._shortlist(name)
        close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
        answer = close[0] if close else None
        self._memo[name] = answer
        return answer

    def suggest(self, name: str) -> str | None:
        """``did you mean `NAME`?``, or None when nothing is close."""
        match = self.closest(name)
        return f"did you mean `{match}`?" if match else None

    def _shortlist(self, name: str) -> list[str]:
        if self._postings is None:
            postings: dict[str, list[int]] = {}
            for i, candidate in enumerate(self.names):
                for pair in _bigrams(candidate):
                    postings.setdefault(pair, []).append(i)
            self._postings = postings
        # rare pairs first; pairs most names share (a common prefix) tell
        # little and cost most, so they count only while the work is small
        lists = sorted((self._postings.get(pair, []) for pair in _bigrams(name)), key=len)
        shared: Counter[int] = Counter()
        work = 0
        for ids in lists:
            if work and work + len(ids) > _POSTINGS_WORK:
                break
            shared.update(ids)
            work += len(ids)
        # difflib's ratio 2M/(a+b) reaches the 0.6 cutoff only if 3/7 <= b/a <= 7/3
        low, high = 3 * len(name) / 7, 7 * len(name) / 3
        names = self.names
        best = (names[i] for i, _ in shared.most_common(2 * _SHORTLIST))
        return [n for n in best if low <= len(n) <= high][:_SHORTLIST]


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt name most likely meant, or None (never a reserved word).
    Asking many names of one pool: build a :class:`NameIndex` once."""
    return NameIndex(candidates, budget=None).closest(name)


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt name, or None if nothing is close."""
    match = closest(name, candidates)
    return f"did you mean `{match}`?" if match else None


MAX_SHOWN = 100
"""Diagnostics :func:`render` shows of one file; the rest are counted."""
MAX_SHOWN_PER_LINE = 10
"""Diagnostics :func:`render` shows of one source line; the rest are counted."""
LINE_WINDOW = 100
"""Characters of a long source line :func:`render` shows around the caret."""


def _caret_lines(source_line: str, span: Span) -> list[str]:
    """The source line and a caret under the span; a line longer than
    ``LINE_WINDOW`` shows the window around the caret, cut ends marked ``...``."""
    text = source_line.rstrip("\r\n")
    start = span.column - 1
    if span.end_line == span.line:
        width = span.end_column - span.column
    else:
        width = len(text) - start
    width = max(1, min(width, max(1, len(text) - start)))
    first = 0
    if len(text) > LINE_WINDOW:
        first = max(0, min(start - LINE_WINDOW // 3, len(text) - LINE_WINDOW))
    shown = text[first : first + LINE_WINDOW].expandtabs(1)
    width = max(1, min(width, len(shown) - (start - first)))
    lead = "..." if first > 0 else ""
    tail = "..." if first + LINE_WINDOW < len(text) else ""
    pad = " " * (len(lead) + start - first)
    return [f"    {lead}{shown}{tail}", f"    {pad}^{'~' * (width - 1)}"]


def lines_at(source: str, numbers: Iterable[int]) -> dict[int, str]:
    """Source lines ``numbers`` (from 1, split at ``\\n`` only), found in one
    pass without splitting the whole text."""
    out: dict[int, str] = {}
    line, offset = 1, 0
    for number in sorted(set(numbers)):
        # whole chunks first (str.count runs in C), then line by line
        while line < number:
            chunk_end = min(len(source), offset + 4096)
            newlines = source.count("\n", offset, chunk_end)
            if line + newlines >= number or chunk_end == len(source):
                break
            line, offset = line + newlines, chunk_end
        while line < number:
            found = source.find("\n", offset)
            if found < 0:
                return out
            line, offset = line + 1, found + 1
        end = source.find("\n", offset)
        out[number] = source[offset : end if end >= 0 else len(source)].removesuffix("\r")
    return out


def render(
    diagnostics: Sequence[Diagnostic],
    *,
    filename: str | None = None,
    source: str | None = None,
    max_shown: int | None = MAX_SHOWN,
    max_per_line: int | None = MAX_SHOWN_PER_LINE,
) -> str:
    """Render diagnostics as ``file:line:col: error[CODE]: message`` blocks
    (``warning[W...]`` for warnings). Lines split at ``\\n`` only, as the parser counts them.

    At most ``max_shown`` diagnostics of the file and ``max_per_line`` of
    one source line are shown (None: all); a line ``... and N more`` counts
    the rest, and the closing count covers every diagnostic. A long source
    line is shown as a window around the caret, so the text stays in
    proportion to what is shown, whatever the input."""
    shown: list[Diagnostic] = []
    per_line: Counter[int] = Counter()
    hidden_on_line: Counter[int] = Counter()
    hidden = 0
    for diag in diagnostics:
        line = diag.span.line if diag.span is not None else 0
        if max_per_line is not None and line and per_line[line] >= max_per_line:
            hidden_on_line[line] += 1
            continue
        if max_shown is not None and len(shown) >= max_shown:
            hidden += 1
            continue
        per_line[line] += 1
        shown.append(diag)
    lines = lines_at(source, (d.span.line for d in shown if d.span is not None)) if source is not None else {}
    blocks: list[str] = []
    last_of_line = {d.span.line: i for i, d in enumerate(shown) if d.span is not None}
    for i, diag in enumerate(shown):
        where = diag.where or filename or "<input>"
        if diag.span is not None:
            where = f"{filename or '<input>'}:{diag.span.line}:{diag.span.column}"
        out = [f"{where}: {diag.severity}[{diag.code}]: {diag.message}"]
        if diag.span is not None and diag.span.line in lines:
            out.extend(_caret_lines(lines[diag.span.line], diag.span))
        if diag.hint:
            out.append(f"  hint: {diag.hint}")
        if diag.span is not None and last_of_line[diag.span.line] == i and hidden_on_line[diag.span.line]:
            more = hidden_on_line[diag.span.line]
            out.append(f"... and {more} more on line {diag.span.line}")
        blocks.append("\n".join(out))
    if hidden:
        blocks.append(f"... and {hidden} more not shown")
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
    renders them as the ``patternc`` command line does (rendered when first
    asked for, with :func:`render`'s limits).
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
        self._rendered: str | None = None
        first = self.diagnostics[0] if self.diagnostics else None
        super().__init__(f"{first.code}: {first.message}" if first is not None else "no diagnostics")

    def __str__(self) -> str:
        if self._rendered is None:
            self._rendered = render(self.diagnostics, filename=self.filename, source=self.source)
        return self._rendered

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _pattern_error,
            (self.diagnostics, self.filename, self.source, self.warnings),
        )


def _pattern_error(
    diagnostics: Sequence[Diagnostic],
    filename: str | None,
    source: str | None,
    warnings: Sequence[Diagnostic],
) -> PatternError:
    return PatternError(diagnostics, filename=filename, source=source, warnings=warnings)
