"""Random valid programs: exact allowed-pair counts against the float64
reference's mask, and ``patternc fmt`` (idempotent, same plans, comments kept)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import random_program
from reference import language_mask

import patternc
from patternc.export import plan_dict
from patternc.fmt import format_source


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_allowed_counts_are_exact(seed: int) -> None:
    source, sizes = random_program(seed)
    program = patternc.compile(source)
    for plan in program.patterns.values():
        layout = plan.layout(sizes)
        mask = language_mask(plan, sizes)
        assert layout.allowed_entries == int(mask.sum())
        assert layout.density == (int(mask.sum()) / mask.numel() if mask.numel() else 0.0)
        data = plan_dict(plan, sizes, dim=8)["layout"]
        assert data["flops"] == 4 * int(mask.sum()) * 8 == sum(c["flops"] for c in data["calls"])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_fmt_is_idempotent_and_keeps_meaning(seed: int) -> None:
    source, _ = random_program(seed)
    formatted = format_source(source)
    assert format_source(formatted) == formatted
    before, after = patternc.compile(source), patternc.compile(formatted)
    assert {n: (p.groups, p.calls) for n, p in before.patterns.items()} == {
        n: (p.groups, p.calls) for n, p in after.patterns.items()
    }
    assert [line for line in formatted.splitlines() if "#" in line].__len__() == source.count("#")


def test_fmt_canonical_layout() -> None:
    source = "groups a  b c\n\n\n\npattern p{\n  a,b->a ,b[causal]   # keep me\n   c ->  (a , b)[window 2] [causal]\n}\n"
    with pytest.raises(patternc.PatternError):  # a conflict: fmt refuses broken files
        format_source(source)
    source = source.replace(" [causal]\n}", "\n}")
    assert format_source(source) == (
        "groups a b c\n\npattern p {\n    a, b -> a, b[causal]  # keep me\n    c -> (a, b)[window 2]\n}\n"
    )


def test_fmt_keeps_the_space_that_makes_a_modifier_rule_level() -> None:
    source = "groups a b\na, b -> a, b [causal]  # noqa: W102\n"
    assert format_source(source) == source
    plan = patternc.compile(format_source(source)).patterns["default"]
    assert all(k.modifiers.causal for k in plan.calls[0].keys)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patternc", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_fmt_cli_check_and_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "m.pc"
    path.write_text("groups a b\na,b -> a\n")
    result = run("fmt", "--check", str(path))
    assert result.returncode == 1 and f"would reformat {path}" in result.stderr
    assert path.read_text() == "groups a b\na,b -> a\n"
    assert run("fmt", str(path)).returncode == 0
    assert path.read_text() == "groups a b\na, b -> a\n"
    assert run("fmt", "--check", str(path)).returncode == 0
    bad = tmp_path / "bad.pc"
    bad.write_text("groups a\na -> zz\n")
    result = run("fmt", str(bad))
    assert result.returncode == 1 and "E201" in result.stderr


def test_examples_are_formatted() -> None:
    for path in sorted((ROOT / "examples").rglob("*.patc")):
        assert format_source(path.read_text()) == path.read_text(), path
