"""Parse pattern-file text into a syntax tree of frozen dataclasses.

The grammar lives in ``grammars/patternc.lark`` (shipped in the wheel as
``patternc/grammars/patternc.lark``). The LALR parser is built once per
process; a :class:`lark.Transformer` turns Lark's tree into the dataclasses
below in one pass, one method per grammar rule. Every node keeps its
:class:`~patternc.diagnostics.Span` so later stages can point at the source.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import lark

from patternc.diagnostics import Code, Diagnostic, Span, suggest
from patternc.modifiers import MODIFIER_NAMES, NO_MODIFIERS, Modifiers

__all__ = [
    "Difference",
    "GroupDecl",
    "PatternBlock",
    "Rule",
    "Selector",
    "SelectorUnion",
    "SourceFile",
    "TypeRule",
    "Word",
    "parse",
]

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


Selector = Union[Word, SelectorUnion, Difference]


@dataclass(frozen=True, slots=True)
class Rule:
    """``QUERIES -> KEYS_VALUES [modifiers]``."""

    queries: Selector
    keys_values: Selector
    span: Span
    text: str
    modifiers: Modifiers = NO_MODIFIERS


@dataclass(frozen=True, slots=True)
class GroupDecl:
    name: str
    span: Span


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
class SourceFile:
    groups: tuple[GroupDecl, ...]
    patterns: tuple[PatternBlock, ...]
    top_level_rules: tuple[Rule, ...]
    diagnostics: tuple[Diagnostic, ...] = field(default=())
    types: tuple[TypeRule, ...] = field(default=())


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


class _ToSyntaxTree(lark.Transformer[lark.Token, object]):
    """Lark tree -> dataclasses; methods are named after grammar rules."""

    def __init__(self, source_lines: list[str]) -> None:
        super().__init__(visit_tokens=False)
        self.source_lines = source_lines
        self.diagnostics: list[Diagnostic] = []

    def _name(self, token: lark.Token, what: str) -> str:
        text = str(token)
        if not _IDENTIFIER.match(text):
            if "*" in text or "?" in text:
                hint = f"{what} are plain names; globs belong in rules"
                if what == "group names":
                    hint += " (a family of groups is a name with one trailing `*`: `doc*`)"
            else:
                hint = "names start with a letter or `_` and hold letters, digits and `_`"
            self.diagnostics.append(
                Diagnostic(Code.BAD_NAME, f"`{text}` is not a valid {what[:-1]}", _token_span(token), hint)
            )
        return text

    def word(self, children: list[lark.Token]) -> Word:
        token = children[0]
        text = str(token)
        if not ("*" in text or "?" in text) and not _IDENTIFIER.match(text):
            self.diagnostics.append(
                Diagnostic(
                    Code.BAD_NAME,
                    f"`{text}` is not a valid group name",
                    _token_span(token),
                    "names start with a letter or `_` and hold letters, digits and `_`",
                )
            )
        return Word(text, _token_span(token))

    @lark.v_args(meta=True)
    def union(self, meta: lark.tree.Meta, children: list[Selector]) -> SelectorUnion:
        left, right = children
        items = left.items if isinstance(left, SelectorUnion) else (left,)
        return SelectorUnion((*items, right), _span_of(meta))

    @lark.v_args(meta=True)
    def difference(self, meta: lark.tree.Meta, children: list[Selector]) -> Difference:
        left, right = children
        return Difference(left, right, _span_of(meta))

    def modifier(self, children: list[lark.Token]) -> tuple[str, int | None] | None:
        name_token = children[0]
        name = str(name_token)
        arg = children[1] if len(children) > 1 else None
        span = _token_span(name_token)
        if name not in MODIFIER_NAMES:
            self._error(
                Code.BAD_MODIFIER,
                f"unknown modifier `{name}`",
                span,
                suggest(name, MODIFIER_NAMES) or "modifiers: `causal`, `window N`",
            )
            return None
        if name == "causal":
            if arg is not None:
                self._error(
                    Code.BAD_MODIFIER, "`causal` takes no argument", _token_span(arg), "write `[causal]`"
                )
                return None
            return ("causal", None)
        if arg is None or not str(arg).isdigit() or int(str(arg)) < 1:
            where = _token_span(arg) if arg is not None else span
            self._error(
                Code.BAD_MODIFIER, "`window` needs a positive number of tokens", where, "e.g. `[window 256]`"
            )
            return None
        return ("window", int(str(arg)))

    def modifiers(self, children: list[tuple[str, int | None] | None]) -> Modifiers:
        causal, window = False, None
        for item in children:
            if item is None:
                continue
            if item[0] == "causal":
                causal = True
            else:
                window = item[1]
        return Modifiers(causal, window)

    def _error(self, code: str, message: str, span: Span, hint: str | None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    @lark.v_args(meta=True)
    def rule(self, meta: lark.tree.Meta, children: list[object]) -> Rule:
        queries, keys_values = children[0], children[1]
        modifiers = children[2] if len(children) > 2 else Modifiers()
        assert isinstance(modifiers, Modifiers)
        span = _span_of(meta)
        if span.line == span.end_line:
            text = self.source_lines[span.line - 1][span.column - 1 : span.end_column - 1]
        else:
            text = self.source_lines[span.line - 1][span.column - 1 :].rstrip() + " ..."
        return Rule(queries, keys_values, span, text.strip(), modifiers)  # type: ignore[arg-type]

    def groups_decl(self, children: list[lark.Token]) -> tuple[GroupDecl, ...]:
        return tuple(GroupDecl(self._group_name(tok), _token_span(tok)) for tok in children)

    def _group_name(self, token: lark.Token) -> str:
        """A group name, or a family ``prefix*`` (one trailing ``*``); ``self`` is reserved."""
        text = str(token)
        if text == "self":
            self.diagnostics.append(
                Diagnostic(
                    Code.BAD_NAME,
                    "`self` is reserved (`a -> self`: each group attends to itself)",
                    _token_span(token),
                    "pick another group name",
                )
            )
            return text
        if text.endswith("*") and _IDENTIFIER.match(text[:-1]):
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

    def types_block(self, children: list[TypeRule]) -> list[TypeRule]:
        return list(children)

    def start(self, children: list[object]) -> SourceFile:
        groups: list[GroupDecl] = []
        patterns: list[PatternBlock] = []
        top_rules: list[Rule] = []
        types: list[TypeRule] = []
        for child in children:
            if isinstance(child, list):
                types.extend(child)
            elif isinstance(child, tuple):
                groups.extend(child)
            elif isinstance(child, PatternBlock):
                patterns.append(child)
            elif isinstance(child, Rule):
                top_rules.append(child)
        return SourceFile(
            tuple(groups), tuple(patterns), tuple(top_rules), tuple(self.diagnostics), tuple(types)
        )


# ------------------------------------------------------------------ parse


def parse(text: str) -> SourceFile:
    """Parse pattern-file text. Syntax problems come back as diagnostics on the
    result (one per line at most, all lines reported), never as exceptions."""
    syntax_errors: list[Diagnostic] = []
    lines_with_errors: set[int] = set()

    def on_error(error: lark.exceptions.UnexpectedInput) -> bool:
        line = error.line if isinstance(error.line, int) and error.line > 0 else 1
        if isinstance(error, lark.exceptions.UnexpectedToken):
            token = error.token
            if token.type == "$END":
                line = max(1, len(text.splitlines()))
                span = Span.point(line, len(text.splitlines()[-1]) + 1 if text.splitlines() else 1)
            else:
                span = _token_span(token)
                line = span.line
            expected = set(error.accepts or error.expected)
            if line not in lines_with_errors:
                lines_with_errors.add(line)
                syntax_errors.append(
                    Diagnostic(
                        Code.SYNTAX,
                        f"unexpected {_describe_token(token)}; expected {_describe_expected(expected)}",
                        span,
                        _syntax_hint(expected, token.type),
                    )
                )
            return bool(token.type != "$END")
        if isinstance(error, lark.exceptions.UnexpectedCharacters):
            column = error.column if isinstance(error.column, int) and error.column > 0 else 1
            if line not in lines_with_errors:
                lines_with_errors.add(line)
                char = error.char
                shown = repr(char) if not char.isprintable() or char.isspace() else f"`{char}`"
                syntax_errors.append(
                    Diagnostic(
                        Code.SYNTAX,
                        f"unexpected character {shown}",
                        Span.point(line, column),
                        "group names hold letters, digits and `_`; globs add `*` and `?`",
                    )
                )
            return True
        return False

    try:
        tree = _parser().parse(text, on_error=on_error)
    except lark.exceptions.UnexpectedInput as error:
        # Recovery gave up; everything collected so far is still reported.
        if not syntax_errors:  # pragma: no cover - on_error records first
            syntax_errors.append(Diagnostic(Code.SYNTAX, str(error).splitlines()[0], None))
        return SourceFile((), (), (), tuple(syntax_errors))
    if syntax_errors:
        return SourceFile((), (), (), tuple(syntax_errors))
    result = _ToSyntaxTree(text.splitlines()).transform(tree)
    assert isinstance(result, SourceFile)
    return result
