"""``patternc fmt``: the canonical layout of a pattern file.

Line-based, so every comment stays where it was and the order of statements
never changes. Per line: tokens are re-spaced (``a, b -> c[causal]``, one
space around ``->`` and ``-``, none inside brackets, a family's parts as
``doc*{prefix, text}``), indentation is four
spaces per open block plus four on a continuation line, trailing blanks go,
runs of blank lines become one, and the file ends in one newline. Whether a
``[`` touches the selector before it is kept: that is the difference between
per-key and rule-level modifiers. Formatting is idempotent, and a formatted
file compiles to the same plans as the original (both tested).
"""

from __future__ import annotations

import re

from patternc.compiler import compile_text

__all__ = ["format_source"]

_TOKEN = re.compile(r"->|[A-Za-z0-9_*?.+]+|[,;{}()\[\]:\-\\]")
_NO_SPACE_BEFORE = {",", ";", ")", "]", ":"}
_NO_SPACE_AFTER = {"(", "["}
_CONTINUES = (",", "-", "->", "(", "\\")


def _split_comment(line: str) -> tuple[str, str]:
    code, sep, comment = line.partition("#")
    return code, sep + comment


def _tokens(code: str) -> list[tuple[str, bool]]:
    """Tokens of a code fragment, each with "glued to what came before"."""
    out = []
    for match in _TOKEN.finditer(code):
        start = match.start()
        out.append((match.group(), start > 0 and not code[start - 1].isspace()))
    return out


def _join(tokens: list[tuple[str, bool]], parts: bool = False) -> str:
    """Tokens re-spaced; ``parts``: a ``groups`` line, whose braces hold a
    family's parts and touch them (``doc*{prefix, text}``)."""
    text = ""
    previous = None
    for token, glued in tokens:
        if previous is not None:
            space = not (
                token in _NO_SPACE_BEFORE
                or previous in _NO_SPACE_AFTER
                or (token == "[" and glued)
                or (parts and (token in "{}" or previous == "{"))
            )
            text += " " if space else ""
        text += token
        previous = token
    return text


def format_source(text: str, filename: str | None = None) -> str:
    """The canonical form of ``text``; raises :class:`~patternc.PatternError`
    when the file has errors (a file that does not compile is not reformatted)."""
    compile_text(text, filename)
    out: list[str] = []
    depth = 0
    continued = False
    parens = 0
    in_groups = parts_open = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        code, comment = _split_comment(raw)
        tokens = _tokens(code)
        if not tokens and not comment.strip():
            if out and out[-1] != "":
                out.append("")
            continued = False
            continue
        closes_first = bool(tokens) and tokens[0][0] == "}"
        continues = (continued and not parts_open) or parens > 0
        level = depth - (1 if closes_first else 0) + (1 if continues else 0)
        if tokens and tokens[0][0] == "groups":
            in_groups = True
        elif tokens and tokens[0][0] != "," and not continued and not parts_open:
            in_groups = False
        body = _join(tokens, parts=in_groups)
        if comment:
            comment = comment.rstrip()
            body = f"{body}  {comment}" if body else comment
        out.append("    " * max(level, 0) + body)
        for token, _ in tokens:
            depth += {"{": 1, "}": -1}.get(token, 0)
            parens += {"(": 1, ")": -1}.get(token, 0)
            if in_groups and token in "{}":
                parts_open = token == "{"
        if tokens:
            continued = tokens[-1][0] in _CONTINUES
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"
