"""Grammar-aware fuzzing of the compiler and the CLI's reader: every input
gives a program or located diagnostics, never a traceback, never slowly."""

from __future__ import annotations

import time
from pathlib import Path

from fuzzmode import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patternc
from patternc.compiler import read_source

ROOT = Path(__file__).resolve().parent.parent.parent
SEEDS = [p.read_text() for p in sorted((ROOT / "examples").rglob("*.patc"))] + [
    "groups a b doc*\na -> a, b[causal]\nb, doc* -> self [window 3]\n",
    "groups x y z\ntypes { t: x, y }\npattern p { x -> (y, z)[causal] ; y, z -> * - x }\npattern q { * -> * }\n",
]
PIECES = [
    *"ab_*?,-()[]{};:#\\ \t\n19.",
    "->", "groups ", "pattern ", "types ", "causal", "window ", "[causal]", "[window 2]", " [", "-3", "1.5",
    "self", "# noqa\n", "# noqa: W101\n", "\x0c", "\x0b", "\u2028", "\r\n", "doc*", "\ufeff", "\x00", "é",
]  # fmt: skip
SLOW_S = 5.0
"""Any input of these sizes compiles or fails in milliseconds; seconds mean a superlinear path."""


def check(text: str) -> None:
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
    check(text)


@fuzz(1500, 300_000)
@given(text=st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_token_soup(text: str) -> None:
    check("groups a b ab\n" + text)


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
