"""Grammar-aware fuzzing of the compiler and the CLI's reader: every input
gives a program or located diagnostics, never a traceback, never slowly."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzzmode import LONG, examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patternc
from patternc.compiler import MAX_SOURCE_BYTES, read_source
from patternc.diagnostics import diagnostics_json
from patternc.fmt import format_source

ROOT = Path(__file__).resolve().parent.parent.parent
SEEDS = [p.read_text() for p in sorted((ROOT / "examples").rglob("*.patc"))] + [
    "groups a b doc*\na -> a, b[causal]\nb, doc* -> self [window 3]\n",
    "groups x y z\ntypes { t: x, y }\npattern p { x -> (y, z)[causal] ; y, z -> * - x }\npattern q { * -> * }\n",
    "groups s run*{text, image} t*_* q\ns -> nothing\nrun*.text -> s, run*[before 2], self[causal]\n"
    "run*.image -> run*[upto]\nt*_* -> t*_*[kernel 3], s\nq -> (s, t*_*)[causal, back 4, across]\n",
    "groups text image[7, 9] video[3, 5, 6] a[1, 4] b[1, 4]\ntext -> *\nimage -> text, image[kernel 3 5]\n"
    "video -> video[near 1 0 2], text[causal]\na, b -> self[kernel 1 3], text\n",
    "groups frame* clip[4, 1, 4]\npattern p { frame* -> frame*[before], self[causal] ; clip -> clip[kernel 3 1 3] }\n"
    "pattern q { frame*, clip -> * [causal] }\n",
]
PIECES = [
    *"ab_*?,-()[]{};:#\\ \t\n19.",
    "->", "groups ", "pattern ", "types ", "causal", "window ", "[causal]", "[window 2]", " [", "-3", "1.5",
    "self", "# noqa\n", "# noqa: W101\n", "\x0c", "\x0b", "\u2028", "\r\n", "doc*", "\ufeff", "\x00", "é",
    ".", "{text, image}", "*.text", "[upto]", "[same]", "[before 2]", "[kernel 3]", "[near 1]", "nothing",
    "*_*", "[across]", "back ", "ahead ", "dilate ", ", self[causal]", "[causal, back 3, across]",
    "[7, 9]", "[3, 5, 6]", "[1]", "[0, 3]", "[2, 1.5]", " [4 4]", "[kernel 9]", "[kernel 3 7 7]", "[kernel 3 0]",
    "[near 0 1 1]", "[kernel 3, causal]", "[near 1, window 2]", "kernel ", "near ", "self[kernel 3]",
    "im*[3, 3]", "[kernel 3] [causal]", "[kernel 2 2 2 2 2]", "[near -1]", "[kernel 99999999999999999999]",
]  # fmt: skip
SLOW_S = 5.0
"""Any input of these sizes compiles or fails in milliseconds; seconds mean a superlinear path."""


def check(text: str, formats: bool = False) -> None:
    """``text`` compiles to plans that cover every group once, or fails with
    located diagnostics, in milliseconds; with ``formats``, a text that
    compiles also formats to a fixed point with the same plans."""
    start = time.perf_counter()
    try:
        program = patternc.compile(text, filename="fuzz.pc")
    except patternc.PatternError as error:
        assert error.diagnostics
        for diag in error.diagnostics:
            assert diag.code[0] in "EW" and diag.message
            assert diag.span is not None or diag.where is not None, diag
            if diag.span is not None:
                assert diag.span.line >= 1 and diag.span.column >= 1
        assert str(error)
    else:
        for plan in program.patterns.values():
            queries = [g for call in plan.calls for g in call.queries]
            assert sorted(queries) == sorted(program.groups)  # exhaustive, no overlap
        for warning in program.warnings:
            assert warning.code.startswith("W") and warning.span is not None
        if formats:
            formatted = format_source(text)
            assert format_source(formatted) == formatted
            again = patternc.compile(formatted)
            assert {n: (p.groups, p.calls) for n, p in again.patterns.items()} == {
                n: (p.groups, p.calls) for n, p in program.patterns.items()
            }
    assert time.perf_counter() - start < SLOW_S


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A seed text with pieces inserted, deleted and replaced at random places."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(PIECES))
        if action == "insert":
            text = text[:at] + piece + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    return text


def fuzz(ci: int, long: int) -> settings:
    return settings(
        max_examples=examples(ci, long),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )


@fuzz(3000, 500_000)
@given(text=mutated())
def test_mutated_examples(text: str) -> None:
    check(text, formats=True)


@fuzz(1500, 300_000)
@given(text=st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_token_soup(text: str) -> None:
    check("groups a b ab\n" + text, formats=True)


@fuzz(300, 150_000)
@given(data=st.binary(max_size=400))
def test_random_bytes_through_the_file_reader(data: bytes, tmp_path_factory: object) -> None:
    path = Path(tmp_path_factory.mktemp("f")) / "f.pc"  # type: ignore[attr-defined]
    path.write_bytes(data)
    try:
        text = read_source(path)
    except patternc.PatternError as error:
        assert error.diagnostics[0].code in ("E001", "E002")
        return
    check(text)


@fuzz(100, 50_000)
@given(
    depth=st.integers(0, 400),
    width=st.integers(1, 3000),
    chain=st.integers(0, 3000),
    modifiers=st.booleans(),
)
def test_deep_and_wide_inputs(depth: int, width: int, chain: int, modifiers: bool) -> None:
    names = [f"g{i}" for i in range(width)]
    mod = "[causal]" if modifiers else ""
    nested = "(" * depth + "g0" + mod + ")" * depth
    chained = "*" + " - g0" * chain
    check(f"groups {' '.join(names)}\n{', '.join(names)} -> {nested}, {chained}\n")


# ------------------------------------------------------------ costly inputs
# Inputs built to make the compiler's cost grow faster than its input: long
# lines re-rendered per diagnostic, thousands of diagnostics, megabytes of
# blank lines, "did you mean" against thousands of names. Each must stay in
# proportion to its size, in time and in memory (tracemalloc's peak).

MEMORY_BASE = 32 * 2**20
MEMORY_PER_BYTE = 24
"""Peak memory allowed: a base plus this many bytes per input character."""
RENDERED_MAX = 200_000
"""Characters of rendered text however many diagnostics (the rest are counted)."""


def _names(count: int, form: str = "g{}") -> str:
    return " ".join(form.format(i) for i in range(count))


COSTLY: dict[str, Callable[[], str]] = {
    "duplicate modifiers on one line": lambda: "groups a\na -> a [" + ", ".join(["causal"] * 9_000) + "]\n",
    "4 MB of blank lines, then an unknown name": lambda: (
        "groups a\n" + "\n" * (MAX_SOURCE_BYTES - 100) + "a -> zz\n"
    ),
    "4 MB of blank lines, then a syntax error": lambda: (
        "groups a\n" + "\n" * (MAX_SOURCE_BYTES - 100) + "a -> (\n"
    ),
    "a 3 MB line with an error at its end": lambda: "groups a\na -> a" + " " * 3_000_000 + "?x\n",
    "unknown names on one line": lambda: (
        "groups a\na -> " + ", ".join(f"zz{i}" for i in range(19_000)) + "\n"
    ),
    "an unknown name on each of 5,000 lines": lambda: "groups a\na -> a\n" + "a -> zz\n" * 5_000,
    "misspelt names among 18,000 groups": lambda: (
        f"groups {_names(18_000, 'group_{}_x')}\n* -> "
        + ", ".join(f"grop_{i}_x" for i in range(0, 18_000, 10))
        + "\n"
    ),
    "misspelt globs among 18,000 groups": lambda: (
        f"groups {_names(18_000, 'group_{}_x')}\n" + "".join(f"grop{i}_* -> group_1_x\n" for i in range(100))
    ),
    "4,000 overlaps of wide rules": lambda: f"groups {_names(4_000)}\n* -> *\n* -> *\n",
}


def _report(text: str) -> tuple[str, str]:
    """What the CLI prints for a text: rendered diagnostics and their JSON."""
    try:
        patternc.compile(text, filename="costly.pc")
    except patternc.PatternError as error:
        return str(error), json.dumps(diagnostics_json(error.diagnostics, "costly.pc"))
    return "", "[]"


@pytest.mark.parametrize("name", sorted(COSTLY))
def test_costly_inputs_stay_in_proportion(name: str) -> None:
    text = COSTLY[name]()
    start = time.perf_counter()
    rendered, listed = _report(text)
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    try:
        _report(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rendered, "every costly input has problems"
    assert elapsed < SLOW_S, f"{elapsed:.1f} s"
    assert peak < MEMORY_BASE + MEMORY_PER_BYTE * len(text), (
        f"{peak / 2**20:.0f} MiB for {len(text):,} characters"
    )
    assert len(rendered) < RENDERED_MAX
    assert len(listed) < 64 * len(text) + 65_536


@fuzz(12, 2_000)
@given(
    piece=st.sampled_from([*PIECES, "zz, ", "[causal, causal]", "a -> zz\n", "a -> a\n", "(", "groups a\n"]),
    count=st.integers(1_000, 40_000 if LONG else 12_000),
    one_line=st.booleans(),
)
def test_repeated_pieces_stay_in_proportion(piece: str, count: int, one_line: bool) -> None:
    """A piece repeated thousands of times, on one line or one per line."""
    body = (piece if one_line else piece.replace("\n", " ") + "\n") * count
    text = "groups a b ab\na -> " + body
    tracemalloc.start()
    start = time.perf_counter()
    try:
        rendered, _ = _report(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 4 * SLOW_S  # traced: allocations cost several times more
    assert peak < MEMORY_BASE + MEMORY_PER_BYTE * len(text)
    assert len(rendered) < RENDERED_MAX
