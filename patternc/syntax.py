"""Parse pattern-file text into a syntax tree of frozen dataclasses.

The grammar lives in ``grammars/patternc.lark`` (shipped in the wheel as
``patternc/grammars/patternc.lark``). The LALR parser is built once per
process; a :class:`lark.Transformer` turns Lark's tree into the dataclasses
below in one pass, one method per grammar rule. Every node keeps its
:class:`~patternc.diagnostics.Span` so later stages can point at the source.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import lark

from patternc.diagnostics import RESERVED_WORDS, Code, Diagnostic, Edit, Fix, Span, closest, rename_fix
from patternc.members import GRID_RELATIONS, MEMBER_RELATION_NAMES, MemberRelation, grid_axes, is_family
from patternc.modifiers import MODIFIER_NAMES, Modifiers

__all__ = [
    "DEFAULT_PATTERN",
    "Difference",
    "GroupDecl",
    "GroupsStatement",
    "Modified",
    "ModifierList",
    "PatternBlock",
    "Rule",
    "Selector",
    "SelectorUnion",
    "SourceFile",
    "TypeRule",
    "TypesBlock",
    "Word",
    "parse",
    "pattern_blocks",
    "selector_words",
    "source_lines",
]

DEFAULT_PATTERN = "default"
"""The name of the pattern a file's top-level rules (outside any block) form."""
KEYWORDS = ("groups", "pattern", "types")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class Word:
    """A group name (``volume_anchors``) or a glob (``surface_*``, ``*``)."""

    text: str
    span: Span

    @property
    def is_glob(self) -> bool:
        return "*" in self.text or "?" in self.text


@dataclass(frozen=True, slots=True)
class SelectorUnion:
    """``a, b, c``: every group any item selects."""

    items: tuple[Selector, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Difference:
    """``a - b``: the groups ``a`` selects that ``b`` does not."""

    left: Selector
    right: Selector
    span: Span


@dataclass(frozen=True, slots=True)
class ModifierList:
    """``[causal, window 8]`` as written, with its span; ``members`` is a
    member relation in the list (``[upto, causal]``)."""

    modifiers: Modifiers
    span: Span
    members: MemberRelation | None = None

    def text(self) -> str:
        """``[upto, causal]``: the relation first, then the token modifiers
        (empty for an empty list)."""
        parts = ([self.members.text()] if self.members is not None else []) + self.modifiers.parts()
        return f"[{', '.join(parts)}]" if parts else ""


@dataclass(frozen=True, slots=True)
class Modified:
    """``text[causal]`` or ``(a, b)[window 4]``: the groups ``inner`` selects,
    each with these modifiers (key side only)."""

    inner: Selector
    modifiers: ModifierList
    span: Span


Selector = Union[Word, SelectorUnion, Difference, Modified]


def selector_words(node: Selector) -> Iterator[Word]:
    """The names and globs of a selector, in source order."""
    stack: list[Selector] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Word):
            yield item
        elif isinstance(item, SelectorUnion):
            stack.extend(reversed(item.items))
        elif isinstance(item, Difference):
            stack.extend((item.right, item.left))
        else:
            stack.append(item.inner)


@dataclass(frozen=True, slots=True)
class Rule:
    """``QUERIES -> KEYS_VALUES [modifiers]``; ``modifiers`` are the rule-level
    ones (after the rule), per-key ones sit in the key selector."""

    queries: Selector
    keys_values: Selector
    span: Span
    text: str
    modifiers: ModifierList | None = None


@dataclass(frozen=True, slots=True)
class GroupDecl:
    name: str
    span: Span
    shape: tuple[int, ...] = ()
    """``groups image[16, 16]``: the grid its tokens lie on, row-major (empty: none)."""
    bad_shape: bool = False
    """Declared with a shape that was reported (E208): rules reading it by
    coordinates are not reported again."""


@dataclass(frozen=True, slots=True)
class GroupsStatement:
    """``groups a b c``."""

    groups: tuple[GroupDecl, ...]


@dataclass(frozen=True, slots=True)
class PatternBlock:
    """``pattern NAME { rules }``; top-level rules form one block named ``default``
    whose ``name_span`` is None."""

    name: str
    name_span: Span | None
    rules: tuple[Rule, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class TypeRule:
    """``TYPE: selector`` inside ``types { ... }``: the selected groups use the
    weight bank named ``TYPE``."""

    type_name: str
    name_span: Span
    selector: Selector
    span: Span


@dataclass(frozen=True, slots=True)
class TypesBlock:
    """``types { ... }``."""

    rules: tuple[TypeRule, ...]


@dataclass(frozen=True, slots=True)
class SourceFile:
    groups: tuple[GroupDecl, ...]
    patterns: tuple[PatternBlock, ...]
    top_level_rules: tuple[Rule, ...]
    diagnostics: tuple[Diagnostic, ...] = field(default=())
    types: tuple[TypeRule, ...] = field(default=())
    skipped_lines: frozenset[int] = field(default=frozenset())
    """Lines left out after a syntax error (the rest of the file is still
    checked; checks that those lines could change are not reported)."""
    suppressed: tuple[tuple[int, frozenset[str]], ...] = field(default=())
    """``(line, codes)``: ``# noqa: W101`` comments (empty set: every warning)."""


def pattern_blocks(source: SourceFile) -> tuple[PatternBlock, ...]:
    """The file's pattern blocks; top-level rules form one block named
    :data:`DEFAULT_PATTERN` (no ``name_span``) spanning them."""
    if source.patterns:
        return source.patterns
    if not source.top_level_rules:
        return ()
    first, last = source.top_level_rules[0].span, source.top_level_rules[-1].span
    span = Span(first.line, first.column, last.end_line, last.end_column)
    return (PatternBlock(DEFAULT_PATTERN, None, source.top_level_rules, span),)


# ---------------------------------------------------------------- grammar


def _grammar_text() -> str:
    packaged = resources.files("patternc") / "grammars" / "patternc.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # Running from a source checkout without installing: the grammar sits
    # beside the package.
    return (Path(__file__).resolve().parent.parent / "grammars" / "patternc.lark").read_text(encoding="utf-8")


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(
        _grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
    )


_TERMINAL_NAMES = {
    "WORD": "a group name or glob",
    "_ARROW": "`->`",
    "_NL": "end of line",
    "_SEMI": "`;`",
    "_COMMA": "`,`",
    "_MINUS": "`-`",
    "_LBRACE": "`{`",
    "_RBRACE": "`}`",
    "_LPAR": "`(`",
    "_LBRACKET": "`[`",
    "_RBRACKET": "`]`",
    "_KEY_LBRACKET": "`[`",
    "NUMBER": "a number",
    "_RPAR": "`)`",
    "_GROUPS": "`groups`",
    "_PATTERN": "`pattern`",
    "_TYPES": "`types`",
    "_COLON": "`:`",
    "$END": "end of file",
}


def _describe_expected(names: set[str]) -> str:
    described = sorted({_TERMINAL_NAMES.get(n, n) for n in names})
    if not described:
        return "nothing"
    if len(described) == 1:
        return described[0]
    return ", ".join(described[:-1]) + " or " + described[-1]


def _describe_token(token: lark.Token) -> str:
    if token.type in ("_NL", "$END"):
        return _TERMINAL_NAMES[token.type]
    return f"`{token.value}`"


def _syntax_hint(expected: set[str], got: str) -> str | None:
    if "_ARROW" in expected:
        return "a rule reads `QUERIES -> KEYS_VALUES`, e.g. `surface_* -> surface_anchors`"
    if got == "$END" and "_RBRACE" in expected:
        return "a `pattern NAME {` block is missing its closing `}`"
    if "_LBRACE" in expected:
        return "a pattern block reads `pattern NAME { rules }`"
    if "WORD" in expected and got in ("_RBRACE", "_NL", "_SEMI", "$END"):
        return "a selector is missing here: name a group, a glob, or a list of them"
    return None


def _shape_hint(lines: list[str], line: int, column: int) -> tuple[str, Fix | None] | None:
    """At an error in a ``groups`` line's ``[``: how a shape is written
    (``image[16, 16]``: touching the name, numbers between commas), with a
    fix where the repair is clear; None elsewhere."""
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    if not text.lstrip().startswith("groups "):
        return None
    at = column - 1
    opened = text.rfind("[", 0, at + 1)
    closed = text.find("]", at)
    if opened < 0 or closed < 0 or "]" in text[opened:at]:
        return None
    numbers = re.findall(r"[0-9]+", text[opened + 1 : closed])
    before = text[:opened].rstrip()
    name = re.search(r"[A-Za-z0-9_*?.]+$", before)
    if (
        not numbers
        or name is None
        or not re.fullmatch(r"[0-9]+([\s,]+[0-9]+)*\s*", text[opened + 1 : closed])
    ):
        return None
    shape = f"{name.group()}[{', '.join(numbers)}]"
    start = Span(line, name.start() + 1, line, closed + 2)
    return f"a shape touches its group's name and lists its sizes between commas: `{shape}`", Fix(
        f"write `{shape}`", (Edit(start, shape),)
    )


_MODIFIER_PIECE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[-+]?[0-9]+|\S")
_MODIFIER_FORMS = "modifiers read `[causal]`, `[window 256]` or `[causal, window 256]`"


def _modifier_hint(lines: list[str], line: int, column: int) -> tuple[str, Fix | None] | None:
    """At an error inside ``[...]``: the modifier list as it should read
    (``[causal window 256]``, ``[causal, window=256]`` -> ``[causal, window
    256]``) with a fix, the forms modifiers take when no repair is clear,
    or None when the error is not inside brackets."""
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    at = column - 1
    opened = text.rfind("[", 0, at)
    if opened < 0 or "]" in text[opened:at]:
        return None
    closed = text.find("]", at)
    end = closed if closed >= 0 else len(text.split("#", 1)[0].rstrip())
    content = text[opened + 1 : end]
    parts: list[str] = []
    pieces = _MODIFIER_PIECE.findall(content)
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        i += 1
        if piece in (",", ";", "=", ":"):
            continue
        if piece == "causal" and "causal" not in parts:
            parts.append("causal")
            continue
        if piece == "window":
            while i < len(pieces) and pieces[i] in ("=", ":"):
                i += 1
            if i < len(pieces) and pieces[i].lstrip("+").isdigit() and int(pieces[i]) >= 1:
                if any(p.startswith("window") for p in parts):
                    return _MODIFIER_FORMS, None
                parts.append(f"window {int(pieces[i])}")
                i += 1
                continue
        return _MODIFIER_FORMS, None
    fixed = ", ".join(parts)
    if not parts or (fixed == content.strip() and closed >= 0):
        return _MODIFIER_FORMS, None
    if closed < 0:
        span = Span(line, opened + 2, line, end + 1)
        return f"close the modifier list: `[{fixed}]`", Fix(f"write `[{fixed}]`", (Edit(span, f"{fixed}]"),))
    span = Span(line, opened + 2, line, end + 1)
    return (
        f"modifiers are separated by `,` and `window` takes its size after a space: write `[{fixed}]`",
        Fix(f"write `[{fixed}]`", (Edit(span, fixed),)),
    )


_FIRST_WORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s+")


def _keyword_typo(lines: list[str], line: int, column: int) -> Diagnostic | None:
    """``gruops a b``: a statement that fails at its second word because its
    first is a misspelt keyword."""
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    match = _FIRST_WORD.fullmatch(text[: column - 1])
    following = text[column - 1 : column]
    if match is None or not (following.isalnum() or following in "_*?{"):
        return None
    word = match.group(1)
    # not `closest`: that never proposes reserved words, and keywords are
    close = difflib.get_close_matches(word.lower(), KEYWORDS, n=1, cutoff=0.6)
    meant = close[0] if close else None
    if meant is None or word == meant:
        return None
    span = Span(line, match.start(1) + 1, line, match.end(1) + 1)
    return Diagnostic(
        Code.SYNTAX,
        f"unknown keyword `{word}`",
        span,
        f"did you mean `{meant}`? a statement is `groups ...`, `pattern NAME {{ ... }}`, "
        "`types { ... }` or a rule",
        fix=rename_fix(span, word, meant),
    )


def _unexpected_character(lines: list[str], line: int, column: int, char: str) -> Diagnostic:
    shown = repr(char) if not char.isprintable() or char.isspace() else f"`{char}`"
    at = Span.point(line, column)
    in_brackets = _modifier_hint(lines, line, column)
    if in_brackets is not None:
        hint, fix = in_brackets
        return Diagnostic(Code.SYNTAX, f"unexpected character {shown} in a modifier list", at, hint, fix=fix)
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    arrow = next((a for a in ("=>", "\u2192", "\u27f6") if text.startswith(a, column - 1)), None)
    if arrow is not None:
        span = Span.point(line, column, len(arrow))
        return Diagnostic(
            Code.SYNTAX,
            f"`{arrow}` is not an arrow",
            span,
            "a rule reads `QUERIES -> KEYS_VALUES`: write `->`",
            fix=Fix("write `->`", (Edit(span, "->"),)),
        )
    return Diagnostic(
        Code.SYNTAX,
        f"unexpected character {shown}",
        at,
        "group names hold letters, digits and `_`; globs add `*` and `?`",
    )


def _span_of(meta: lark.tree.Meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(token: lark.Token) -> Span:
    line = token.line or 1
    column = token.column or 1
    end_line = token.end_line or line
    end_column = token.end_column or column + max(len(token.value), 1)
    if token.type == "_NL":  # point at the end of the line, not the next one
        return Span.point(line, column)
    return Span(line, column, end_line, end_column)


# ------------------------------------------------------------- transformer

_Item = tuple[str, "int | MemberRelation | None", Span]

_FLAG_MODIFIERS = ("causal", "across")
_TOKENS = ("a number of tokens", "a whole number of tokens")
_NUMBER_MODIFIERS = {  # name: (what it needs, said exactly, least value, example)
    "window": (*_TOKENS, 1, "window 256"),
    "back": (*_TOKENS, 0, "back 255"),
    "ahead": (*_TOKENS, 0, "ahead 16"),
    "dilate": ("a step", "a whole-number step", 1, "dilate 2"),
}
_MODIFIER_MEANING = {
    "window": "a window of N lets each query see keys less than N positions away",
    "back": "`back L` lets each query see at most L keys behind it",
    "ahead": "`ahead R` lets each query see at most R keys ahead of it",
    "dilate": "`dilate D` keeps every D-th key (`dilate 1` keeps them all)",
}
_RELATIONS_LISTED = ", ".join(f"`{r}`" for r in MEMBER_RELATION_NAMES)
_RELATION_EXAMPLES = {
    "before": "e.g. `[before 2]`: the 2 members just before the query's",
    "upto": "e.g. `[upto 2]`: the query's member and the 2 just before it",
    "near": "e.g. `[near 1]`: members within 1 of the query's on every axis",
    "kernel": "e.g. `[kernel 3]`: a 3-wide window of members on every axis",
}
_PLURAL = {"window": "windows", "back": "`back` values", "ahead": "`ahead` values", "dilate": "dilations"}


@dataclass(frozen=True, slots=True)
class _Comma:
    """A `,` between group names in a ``groups`` line (an error, with a fix)."""

    span: Span


class _ToSyntaxTree(lark.Transformer[lark.Token, object]):
    """Lark tree -> dataclasses; methods are named after grammar rules."""

    def __init__(self, source_lines: list[str]) -> None:
        super().__init__(visit_tokens=False)
        self.source_lines = source_lines
        self.diagnostics: list[Diagnostic] = []

    def _error(self, code: str, message: str, span: Span, hint: str | None, fix: Fix | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint, fix=fix))

    def _name(self, token: lark.Token, what: str) -> str:
        text = str(token)
        if text in RESERVED_WORDS:
            self._error(Code.RESERVED_NAME, f"`{text}` is a reserved word, not a {what[:-1]}",
                        _token_span(token), "pick another name")  # fmt: skip
        elif not _IDENTIFIER.match(text):
            if "*" in text or "?" in text:
                hint = f"{what} are plain names; globs belong in rules"
                if what == "group names":
                    hint += " (a family of groups is a name with one trailing `*`: `doc*`)"
            else:
                hint = "names start with a letter or `_` and hold letters, digits and `_`"
            self._error(Code.BAD_NAME, f"`{text}` is not a valid {what[:-1]}", _token_span(token), hint)
        return text

    def word(self, children: list[lark.Token]) -> Word:
        token = children[0]
        text = str(token)
        if not ("*" in text or "?" in text) and not _IDENTIFIER.match(text):
            self._error(
                Code.BAD_NAME,
                f"`{text}` is not a valid group name",
                _token_span(token),
                "a dot joins a family to one of its parts (`doc*.text`, declared by "
                "`groups doc*{prefix, text}`)"
                if "." in text
                else "names start with a letter or `_` and hold letters, digits and `_`",
            )
        return Word(text, _token_span(token))

    @lark.v_args(meta=True)
    def modified_word(self, meta: lark.tree.Meta, children: list[object]) -> Modified:
        token, modifiers = children
        assert isinstance(token, lark.Token) and isinstance(modifiers, ModifierList)
        return Modified(self.word([token]), modifiers, _span_of(meta))

    @lark.v_args(meta=True)
    def modified_group(self, meta: lark.tree.Meta, children: list[object]) -> Modified:
        inner, modifiers = children
        assert isinstance(modifiers, ModifierList)
        return Modified(inner, modifiers, _span_of(meta))  # type: ignore[arg-type]

    @lark.v_args(meta=True)
    def union(self, meta: lark.tree.Meta, children: list[Selector]) -> SelectorUnion:
        return SelectorUnion(tuple(children), _span_of(meta))

    @lark.v_args(meta=True)
    def difference(self, meta: lark.tree.Meta, children: list[Selector]) -> Difference:
        """``a - b - c`` is ``(a - b) - c``, i.e. ``a - (b, c)``: one node."""
        left, *rights = children
        if len(rights) == 1:
            return Difference(left, rights[0], _span_of(meta))
        first, last = rights[0].span, rights[-1].span
        span = Span(first.line, first.column, last.end_line, last.end_column)
        return Difference(left, SelectorUnion(tuple(rights), span), _span_of(meta))

    def modifier(self, children: list[lark.Token]) -> _Item | None:
        name_token = children[0]
        name = str(name_token)
        arg = children[1] if len(children) > 1 else None
        span = _token_span(name_token)
        if len(children) > 2 and name in GRID_RELATIONS:
            return self._per_axis(name, children[1:], span)
        if len(children) > 2:
            self._error(Code.BAD_MODIFIER_ARGUMENT, f"`{name}` takes one argument, got {len(children) - 1}",
                        _token_span(children[2]),
                        "only `near` and `kernel` take one number per axis (`[kernel 3 7 7]`)")  # fmt: skip
            return None
        if name in MEMBER_RELATION_NAMES:
            return self._member_relation(name, arg, span)
        if name not in MODIFIER_NAMES:
            meant = closest(name, MODIFIER_NAMES + MEMBER_RELATION_NAMES)
            self._error(
                Code.UNKNOWN_MODIFIER,
                f"unknown modifier `{name}`",
                span,
                f"did you mean `{meant}`?"
                if meant
                else "modifiers: `causal`, `window N`, `back L`, `ahead R`, `dilate D`, `across`",
                rename_fix(span, name, meant) if meant else None,
            )
            return None
        if name in _FLAG_MODIFIERS:
            if arg is not None:
                self._error(Code.BAD_MODIFIER_ARGUMENT, f"`{name}` takes no argument", _token_span(arg),
                            f"write `[{name}]`")  # fmt: skip
                return None
            return (name, None, span)
        what, whole, least, example = _NUMBER_MODIFIERS[name]
        if arg is None:
            self._error(Code.BAD_MODIFIER_ARGUMENT, f"`{name}` needs {what}", span, f"e.g. `[{example}]`")
            return None
        text = str(arg)
        where = _token_span(arg)
        if not re.fullmatch(r"[-+]?[0-9]+", text):
            self._error(Code.BAD_MODIFIER_ARGUMENT, f"`{name}` needs {whole}, got `{text}`", where,
                        f"e.g. `[{example}]`")  # fmt: skip
            return None
        if int(text) < least:
            message = f"`{name}` must be at least {least}, got {int(text)}"
            self._error(Code.BAD_MODIFIER_ARGUMENT, message, where, _MODIFIER_MEANING[name])
            return None
        return (name, int(text), span)

    def _member_relation(self, name: str, arg: lark.Token | None, span: Span) -> _Item | None:
        """``same``, ``before [N]``, ``upto [N]`` (N: a whole number of members >= 1)."""
        if arg is None and name in GRID_RELATIONS:
            self._error(Code.BAD_MODIFIER_ARGUMENT, f"`{name}` needs a number of members", span,
                        f"e.g. `[{name} {1 if name == 'near' else 3}]`")  # fmt: skip
            return None
        if arg is None:
            return ("members", MemberRelation(name), span)  # type: ignore[arg-type]  # name checked by the caller
        if name == "same":
            self._error(Code.BAD_MODIFIER_ARGUMENT, "`same` takes no argument", _token_span(arg),
                        "write `[same]`: the query's own member")  # fmt: skip
            return None
        text = str(arg)
        least = 0 if name == "near" else 1
        if not re.fullmatch(r"[-+]?[0-9]+", text) or int(text) < least:
            self._error(Code.BAD_MODIFIER_ARGUMENT,
                        f"`{name}` takes a whole number of members (at least {least}), got `{text}`",
                        _token_span(arg),
                        _RELATION_EXAMPLES[name])  # fmt: skip
            return None
        return ("members", MemberRelation(name, int(text)), span)  # type: ignore[arg-type]

    def _per_axis(self, name: str, args: list[lark.Token], span: Span) -> _Item | None:
        """``kernel 3 7 7``: one whole number per axis."""
        least = 0 if name == "near" else 1
        sizes = []
        for arg in args:
            text = str(arg)
            if not re.fullmatch(r"[-+]?[0-9]+", text) or int(text) < least:
                self._error(Code.BAD_MODIFIER_ARGUMENT,
                            f"`{name}` takes whole numbers (at least {least}), got `{text}`",
                            _token_span(arg),
                            "e.g. `[kernel 3 7 7]`: 3 frames, 7 rows, 7 columns")  # fmt: skip
                return None
            sizes.append(int(text))
        return ("members", MemberRelation(name, sizes[0], tuple(sizes)), span)  # type: ignore[arg-type]

    def _modifier_list(self, meta: lark.tree.Meta, children: list[_Item | None]) -> ModifierList:
        members: MemberRelation | None = None
        seen: dict[str, _Item] = {}
        for item in children:
            if item is None:
                continue
            name, value, span = item
            if name == "members":
                assert isinstance(value, MemberRelation)
                if members is not None:
                    self._error(Code.DUPLICATE_MODIFIER,
                                f"two member relations (`{members.text()}` and `{value.text()}`)", span,
                                f"keep one of {_RELATIONS_LISTED}")  # fmt: skip
                    continue
                members = value
                continue
            if name in seen:
                first = seen[name]
                same = first[1] == value
                self._error(
                    Code.DUPLICATE_MODIFIER,
                    f"`{name}` given twice" if same else f"two {_PLURAL[name]} ({first[1]} and {value})",
                    span,
                    "give each modifier once" if same else f"keep one `{name} N`",
                )
                continue
            side = next((seen[s] for s in ("back", "ahead") if s in seen), None)
            if (name == "window" and side is not None) or (name in ("back", "ahead") and "window" in seen):
                window = seen["window"][1] if name != "window" else value
                other = side if name == "window" else item
                assert other is not None and isinstance(window, int)
                self._error(
                    Code.CONFLICTING_MODIFIERS,
                    f"`window {window}` and `{other[0]} {other[1]}` in one list",
                    span,
                    f"`window {window}` is `back {window - 1}, ahead {window - 1}`: write `back` and `ahead` "
                    "alone for a window that differs on its two sides, or `window N` alone",
                )
                continue
            seen[name] = item
        values = {name: item[1] for name, item in seen.items() if isinstance(item[1], int)}
        modifiers = Modifiers(
            causal="causal" in seen,
            window=values.get("window"),
            back=values.get("back"),
            ahead=values.get("ahead"),
            dilation=values.get("dilate") or 1,
            across="across" in seen,
        )
        return ModifierList(modifiers, _span_of(meta), members)

    @lark.v_args(meta=True)
    def modifiers(self, meta: lark.tree.Meta, children: list[_Item | None]) -> ModifierList:
        return self._modifier_list(meta, children)

    @lark.v_args(meta=True)
    def key_modifiers(self, meta: lark.tree.Meta, children: list[_Item | None]) -> ModifierList:
        return self._modifier_list(meta, children)

    @lark.v_args(meta=True)
    def rule(self, meta: lark.tree.Meta, children: list[object]) -> Rule:
        queries, keys_values = children[0], children[1]
        modifiers = children[2] if len(children) > 2 else None
        assert modifiers is None or isinstance(modifiers, ModifierList)
        span = _span_of(meta)
        if span.line == span.end_line:
            text = self.source_lines[span.line - 1][span.column - 1 : span.end_column - 1]
        else:
            text = self.source_lines[span.line - 1][span.column - 1 :].rstrip() + " ..."
        return Rule(queries, keys_values, span, text.strip(), modifiers)  # type: ignore[arg-type]

    def group_comma(self, children: list[lark.Token]) -> _Comma:
        return _Comma(_token_span(children[0]))

    def groups_decl(self, children: list[lark.Token | _Comma]) -> GroupsStatement:
        commas = [c.span for c in children if isinstance(c, _Comma)]
        if commas:
            edits = []
            for comma in commas:
                line = self.source_lines[comma.line - 1]
                spaced = comma.column < len(line) and line[comma.column].isspace()
                edits.append(Edit(comma, "" if spaced else " "))
            names = [str(tok) for tok in children if isinstance(tok, lark.Token)]
            shown = " ".join(names[:4]) + (" ..." if len(names) > 4 else "")
            self._error(
                Code.SYNTAX,
                "group names are separated by spaces, not `,`",
                commas[0],
                f"write `groups {shown}`",
                Fix("separate the group names with spaces", tuple(edits)),
            )
        decls: list[GroupDecl] = []
        for child in children:
            if isinstance(child, lark.Token):
                decls.append(GroupDecl(self._group_name(child), _token_span(child)))
            elif isinstance(child, GroupDecl):
                decls.append(child)
            elif isinstance(child, tuple):
                decls.extend(child)
        return GroupsStatement(tuple(decls))

    def shaped_group(self, children: list[lark.Token]) -> GroupDecl:
        """``image[16, 16]``: a group whose tokens lie on a grid, row-major
        (``video[4, 16, 16]``: frames, rows, columns; any number of axes)."""
        token, *sizes = children
        name = self._group_name(token)
        span = _token_span(token)
        if is_family(name):
            plain = name.split("*")[0] or "image"
            self._error(Code.BAD_SHAPE, f"`{name}` is a family: a shape belongs to one group", span,
                        f"declare one group with its shape (`{plain}[16, 16]`), or a grid family of "
                        "groups (`tile*_*`) with `near`/`kernel` between members")  # fmt: skip
            return GroupDecl(name, span, bad_shape=True)
        shape: list[int] = []
        for size in sizes:
            text = str(size)
            if not re.fullmatch(r"\+?[0-9]+", text) or int(text) < 1:
                self._error(Code.BAD_SHAPE, f"a shape holds whole numbers >= 1, got `{text}`",
                            _token_span(size), "e.g. `image[16, 16]`: 16 rows of 16 tokens")  # fmt: skip
                return GroupDecl(name, span, bad_shape=True)
            shape.append(int(text))
        last = sizes[-1]
        return GroupDecl(name, Span(span.line, span.column, last.end_line or span.line,
                                    (last.end_column or span.end_column) + 1), tuple(shape))  # fmt: skip

    def family_parts(self, children: list[lark.Token]) -> tuple[GroupDecl, ...]:
        """``doc*{prefix, text}``: the groups ``doc*.prefix`` and ``doc*.text``
        (a member has any of the parts, in input order)."""
        family, *parts = children
        name = str(family)
        if grid_axes(name):
            hint = "declare each kind as a grid of its own (`groups image*_* mask*_*`)"
            message = f"`{name}` is a grid: a grid family has no parts"
            self._error(Code.BAD_PARTS, message, _token_span(family), hint)
            return ()
        if not (name.endswith("*") and _IDENTIFIER.match(name[:-1])):
            self._error(Code.BAD_PARTS, f"`{name}` is not a family: only a family `prefix*` has parts",
                        _token_span(family), f"write `{name.rstrip('*')}*{{...}}`")  # fmt: skip
            return ()
        out: list[GroupDecl] = []
        seen: set[str] = set()
        for token in parts:
            part = str(token)
            bare = part[:-1] if part.endswith("*") else part
            if not _IDENTIFIER.match(bare) or part == "self":
                self._error(Code.BAD_PARTS, f"`{part}` is not a part name", _token_span(token),
                            "a part is a name (`text`), or a family of parts (`answer*`)")  # fmt: skip
            elif part in seen:
                self._error(Code.BAD_PARTS, f"part `{part}` given twice", _token_span(token),
                            "list each part once")  # fmt: skip
            else:
                seen.add(part)
                out.append(GroupDecl(f"{name}.{part}", _token_span(token)))
        return tuple(out)

    def _group_name(self, token: lark.Token) -> str:
        """A group name, or a family ``prefix*`` (one trailing ``*``)."""
        text = str(token)
        if text == "self":
            self._error(Code.RESERVED_NAME, "`self` is reserved (`a -> self`: each group attends to itself)",
                        _token_span(token), "pick another group name")  # fmt: skip
            return text
        if (text.endswith("*") and _IDENTIFIER.match(text[:-1])) or grid_axes(text):
            return text
        return self._name(token, "group names")

    @lark.v_args(meta=True)
    def pattern_block(self, meta: lark.tree.Meta, children: list[object]) -> PatternBlock:
        name_token = children[0]
        assert isinstance(name_token, lark.Token)
        rules = tuple(c for c in children[1:] if isinstance(c, Rule))
        name = self._name(name_token, "pattern names")
        return PatternBlock(name, _token_span(name_token), rules, _span_of(meta))

    @lark.v_args(meta=True)
    def type_rule(self, meta: lark.tree.Meta, children: list[object]) -> TypeRule:
        name_token, selector = children
        assert isinstance(name_token, lark.Token)
        name = self._name(name_token, "type names")
        return TypeRule(name, _token_span(name_token), selector, _span_of(meta))  # type: ignore[arg-type]

    def types_block(self, children: list[TypeRule]) -> TypesBlock:
        return TypesBlock(tuple(children))

    def start(self, children: list[object]) -> SourceFile:
        groups: list[GroupDecl] = []
        patterns: list[PatternBlock] = []
        top_rules: list[Rule] = []
        types: list[TypeRule] = []
        for child in children:
            if isinstance(child, TypesBlock):
                types.extend(child.rules)
            elif isinstance(child, GroupsStatement):
                groups.extend(child.groups)
            elif isinstance(child, PatternBlock):
                patterns.append(child)
            elif isinstance(child, Rule):
                top_rules.append(child)
        return SourceFile(
            tuple(groups), tuple(patterns), tuple(top_rules), tuple(self.diagnostics), tuple(types)
        )


# ------------------------------------------------------------------ parse

_NOQA = re.compile(
    r"#[^\S\n]*noqa(?::[^\S\n]*([A-Z][0-9]{3}(?:[^\S\n]*,[^\S\n]*[A-Z][0-9]{3})*))?", re.IGNORECASE
)
_MAX_RECOVERIES = 50
_RECOVERY_CHARACTERS = 1_000_000


def source_lines(text: str) -> list[str]:
    """Lines as the parser counts them: split at ``\\n`` only (``\\f``,
    ``\\v`` and U+2028 are not line breaks in a pattern file)."""
    if "\r" not in text:
        return text.split("\n")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _suppressions(text: str) -> tuple[tuple[int, frozenset[str]], ...]:
    """``# noqa`` comments by line (the first on a line counts), found by one
    search of the text rather than a pass over every line."""
    out: dict[int, frozenset[str]] = {}
    line, counted = 1, 0
    for match in _NOQA.finditer(text):
        line += text.count("\n", counted, match.start())
        counted = match.start()
        if line in out:
            continue
        codes = match.group(1)
        out[line] = frozenset(c.strip().upper() for c in codes.split(",")) if codes else frozenset()
    return tuple(out.items())


def _first_syntax_error(
    text: str, lines: list[str]
) -> tuple[lark.Tree[lark.Token] | None, Diagnostic | None, int]:
    """Parse once: the tree, or the first syntax error (the only one a parse
    can report reliably: what follows it may be a consequence) and the line
    where parsing stopped. ``lines`` are the text's :func:`source_lines`."""
    found: list[Diagnostic] = []
    stopped = [0]

    def on_error(error: lark.exceptions.UnexpectedInput) -> bool:
        line = error.line if isinstance(error.line, int) and error.line > 0 else 1
        if isinstance(error, lark.exceptions.UnexpectedToken):
            token = error.token
            expected = set(error.accepts or error.expected)
            if token.type == "$END":
                last = len(lines) if lines[-1:] != [""] else max(1, len(lines) - 1)
                span = Span.point(last, len(lines[last - 1]) + 1 if lines else 1)
            else:
                span = _token_span(token)
            stopped[0] = span.line
            opened = _unclosed_paren(lines, span) if "_RPAR" in expected else None
            if opened is not None:
                found.append(
                    Diagnostic(
                        Code.SYNTAX,
                        "`(` is never closed",
                        opened,
                        f"close it before line {span.line}, or join the lines",
                    )
                )
            else:
                if token.type == "_LBRACKET" and "_KEY_LBRACKET" in expected:
                    # the `[` expected is the one glued to the name: say so rather than list `[` as both
                    others = _describe_expected(expected - {"_KEY_LBRACKET"})
                    glued = "`[` touching the name before it"
                    message = f"unexpected `[` after a space; expected {glued}, {others}"
                else:
                    message = f"unexpected {_describe_token(token)}; expected {_describe_expected(expected)}"
                hint, fix = _syntax_hint(expected, token.type), None
                in_brackets = (
                    _modifier_hint(lines, span.line, span.column) if "_RBRACKET" in expected else None
                )
                if in_brackets is not None:
                    hint, fix = in_brackets
                shape = _shape_hint(lines, span.line, span.column)
                if shape is not None:
                    hint, fix = shape
                keyword = _keyword_typo(lines, span.line, span.column) if "_ARROW" in expected else None
                found.append(keyword or Diagnostic(Code.SYNTAX, message, span, hint, fix=fix))
        elif isinstance(error, lark.exceptions.UnexpectedCharacters):
            column = error.column if isinstance(error.column, int) and error.column > 0 else 1
            stopped[0] = line
            found.append(_unexpected_character(lines, line, column, error.char))
        return False

    try:
        return _parser().parse(text, on_error=on_error), None, 0
    except lark.exceptions.UnexpectedInput as error:
        if not found:  # pragma: no cover - on_error records first
            found.append(Diagnostic(Code.SYNTAX, str(error).splitlines()[0], None))
        return None, found[0], stopped[0]


def _unclosed_paren(lines: list[str], at: Span) -> Span | None:
    """The ``(`` still open at ``at`` when it sits on an earlier line (the
    error is then that statement's, not the line where parsing stopped)."""
    stack: list[Span] = []
    for number, line in enumerate(lines[: at.line], 1):
        code = line.split("#", 1)[0]
        end = at.column - 1 if number == at.line else len(code)
        for column, char in enumerate(code[:end], 1):
            if char == "(":
                stack.append(Span.point(number, column))
            elif char == ")" and stack:
                stack.pop()
    return stack[-1] if stack and stack[-1].line < at.line else None


def _blank_lines(lines: list[str], numbers: set[int]) -> str:
    """The text with ``numbers`` (1-based) blanked, except their braces: a
    statement with an error is left out, the blocks around it stay."""
    out = list(lines)
    for n in numbers:
        if 0 < n <= len(out):
            out[n - 1] = re.sub(r"[^{}\r]", " ", out[n - 1])
    return "\n".join(out)


def parse(text: str) -> SourceFile:
    """Parse pattern-file text. Problems come back as diagnostics on the
    result, never as exceptions. After a syntax error the statement's lines
    are left out and the rest is parsed again, so one run reports the syntax
    errors and the problems of every other statement."""
    lines = source_lines(text)
    syntax_errors: list[Diagnostic] = []
    skipped: set[int] = set()
    repaired, repaired_lines = text, lines
    tree: lark.Tree[lark.Token] | None = None
    # each recovery parses the file again: a budget of ~1M characters keeps
    # a file full of errors linear (its first errors are reported, then it stops)
    passes = min(_MAX_RECOVERIES, max(2, _RECOVERY_CHARACTERS // max(1, len(text))))
    for _ in range(passes):
        tree, error, stopped = _first_syntax_error(repaired, repaired_lines)
        if error is None:
            break
        span = error.span
        if span is None:
            syntax_errors.append(error)
            tree = None
            break
        # leave the statement out: the error's line, or an unclosed `(` up to
        # the line where parsing stopped
        stop = span.line
        if error.message == "`(` is never closed":
            stop = max(span.line, stopped - 1)
        blank = set(range(span.line, stop + 1))
        if blank <= skipped:  # no progress (an unclosed block...): the errors so far are all
            tree = None
            break
        syntax_errors.append(error)
        skipped |= blank
        repaired = _blank_lines(lines, skipped)
        repaired_lines = source_lines(repaired)
    else:
        tree = None
    suppressed = _suppressions(text)
    if tree is None:
        return SourceFile((), (), (), tuple(syntax_errors), suppressed=suppressed,
                          skipped_lines=frozenset(skipped) or frozenset({0}))  # fmt: skip
    try:
        result = _ToSyntaxTree(repaired_lines).transform(tree)
    except lark.exceptions.VisitError as error:
        if isinstance(error.orig_exc, RecursionError):
            raise error.orig_exc from None
        raise
    assert isinstance(result, SourceFile)
    return SourceFile(
        result.groups,
        result.patterns,
        result.top_level_rules,
        (*syntax_errors, *result.diagnostics),
        result.types,
        frozenset(skipped),
        suppressed,
    )
