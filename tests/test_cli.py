"""The command line: exit codes, messages, bad input, golden output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

from patternc.cli import main

GOLDEN = Path(__file__).parent / "golden"
AB = str(EXAMPLES / "ab_upt.pc")
AB_SIZES = "surface_anchors=1024,surface_queries=4096,volume_anchors=1024,volume_queries=4096"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patternc", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", AB]) == 0
    assert capsys.readouterr().out == f"{AB}: ok (4 groups, 3 pattern(s))\n"


def test_check_reports_diagnostics_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pc"
    bad.write_text("groups surface_anchors volume_anchors\n* -> volume_anchor\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:6: error[E201]: unknown group `volume_anchor`" in err
    assert "hint: did you mean `volume_anchors`?" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x7fELF\x02\x01\x00\x00binary", "looks like a binary file"),
        (b"groups a\n\xff\xfe -> a\n", "is not UTF-8 text (byte 0xff at line 2, column 1)"),
        (b"", "the pattern file is empty"),
        (b"\n\n   \n", "the pattern file is empty"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "f.pc"
    path.write_bytes(content)
    result = run("check", str(path))
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.pc"
    path.write_bytes(b"# " + b"x" * (5 * 1024 * 1024))
    result = run("check", str(path))
    assert result.returncode == 1
    assert "pattern files are limited to 4,194,304" in result.stderr


def test_deeply_nested_selector(tmp_path: Path) -> None:
    path = tmp_path / "deep.pc"
    path.write_text("groups a\na -> " + "(" * 5000 + "a" + ")" * 5000 + "\n")
    result = run("check", str(path))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert f"{path}:2:70: error[E005]: selectors are nested more than 64 parentheses deep" in result.stderr


def test_missing_file_and_directory(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.pc"), str(tmp_path))
    assert result.returncode == 1
    assert f"cannot read `{tmp_path / 'nope.pc'}`: no such file" in result.stderr
    assert f"`{tmp_path}` is a directory, not a pattern file" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--pattern", "jiont"]) == 2
    assert "no pattern `jiont`" in capsys.readouterr().err
    assert main(["compile", AB, "--sizes", "surface_anchor=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown group `surface_anchor`; did you mean `surface_anchors`?" in err
    assert "no size for `surface_anchors`" in err
    assert main(["compile", AB, "--sizes", "surface_anchors=x"]) == 2
    assert "must be an integer or `cache`" in capsys.readouterr().err
    assert main(["compile", AB, "--sizes", "oops"]) == 2
    assert "expected NAME=SIZE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["compile", AB, "--format", "yaml"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_version_and_help() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("patternc 0.")
    result = run("compile", "--help")
    assert result.returncode == 0
    assert "patternc compile examples/ab_upt.pc --pattern joint --format json" in result.stdout


def test_cached_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    sizes = "surface_anchors=cache,surface_queries=7,volume_anchors=none,volume_queries=9"
    assert main(["compile", AB, "--sizes", sizes, "--pattern", "joint"]) == 0
    out = capsys.readouterr().out
    assert "surface_anchors  cache   -" in out
    assert "16 x 0" in out


def test_compile_does_not_import_torch() -> None:
    code = (
        "import sys, patternc\n"
        "from patternc.cli import main\n"
        f"main(['compile', {AB!r}, '--sizes', {AB_SIZES!r}, '--format', 'json'])\n"
        f"main(['check', {AB!r}])\n"
        f"main(['compile', {AB!r}, '--sizes', {AB_SIZES!r}, '--world-size', '4'])\n"
        f"main(['compile', {AB!r}, '--sizes', {AB_SIZES!r}, '--format', 'magi'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


GOLDEN_CASES = {
    "ab_upt.txt": ["compile", "examples/ab_upt.pc"],
    "ab_upt.sizes.txt": ["compile", "examples/ab_upt.pc", "--sizes", AB_SIZES],
    "ab_upt.joint.json": ["compile", "examples/ab_upt.pc", "--pattern", "joint", "--format", "json"],
    "ab_upt.sizes.json": ["compile", "examples/ab_upt.pc", "--sizes", AB_SIZES, "--format", "json"],
    "ab_upt.dot": ["compile", "examples/ab_upt.pc", "--format", "dot"],
}


@pytest.mark.parametrize("golden", sorted(GOLDEN_CASES))
def test_golden_output(golden: str) -> None:
    """Output of `compile` on the examples; regenerate with PATTERNC_UPDATE_GOLDEN=1."""
    result = run(*GOLDEN_CASES[golden])
    assert result.returncode == 0, result.stderr
    path = GOLDEN / golden
    if os.environ.get("PATTERNC_UPDATE_GOLDEN"):
        path.write_text(result.stdout)
    assert result.stdout == path.read_text()
    assert run(*GOLDEN_CASES[golden]).stdout == result.stdout  # byte-identical across runs


def test_every_example_pattern_file_checks() -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in EXAMPLES.glob("*.pc"))
    assert files
    result = run("check", *files)
    assert result.returncode == 0, result.stderr


def test_mask_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--sizes", AB_SIZES, "--pattern", "self_anchor", "--mask", "-"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "pattern self_anchor"
    assert lines[1].startswith("surface_anchors ####....")
    assert "# full 640, + partial 0, . empty 5760 blocks (sparsity 0.900; 256 x 256 tokens per cell)" in out


def test_mask_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "mask.png"
    assert main(["compile", AB, "--sizes", AB_SIZES, "--mask", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {target}\n"


def test_mask_needs_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--mask", "-"]) == 2
    assert "--mask needs --sizes" in capsys.readouterr().err


def test_compile_reports_block_sparsity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--sizes", AB_SIZES, "--pattern", "joint"]) == 0
    assert "blocks 128x128: 1280 full, 0 partial, 5120 empty; block sparsity 0.800" in capsys.readouterr().out


def test_bench_command() -> None:
    result = run(
        "bench",
        "examples/ab_upt.pc",
        "--sizes",
        "surface_anchors=8,surface_queries=24,volume_anchors=8,volume_queries=24",
        "--pattern",
        "self_anchor",
        "--backend",
        "batched",
        "--backend",
        "loop",
        "--backend",
        "auto",
        "--repeat",
        "2",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("self_anchor")]
    # dense always runs (the baseline); auto shows what it picked (batched on CPU)
    assert [r[1] for r in rows] == ["dense", "batched", "loop", "auto:batched"]
    assert rows[0][3] == "1.00"
    assert all(float(r[2]) > 0 and float(r[6]) > 0 for r in rows)
    assert "[4/4] self_anchor / auto" in result.stderr  # progress


def test_bench_usage_errors() -> None:
    result = run("bench", "examples/ab_upt.pc", "--sizes", "surface_anchors=8", "--pattern", "joint")
    assert result.returncode == 2 and "no size for" in result.stderr


def test_mask_and_a_plan_format_are_not_mixed() -> None:
    result = run("compile", "examples/ab_upt.pc", "--sizes", AB_SIZES, "--mask", "-", "--format", "json")
    assert result.returncode == 2
    assert "--mask draws the mask and --format json prints the plan" in result.stderr


def test_check_help_shows_check_examples() -> None:
    result = run("check", "--help")
    assert "--output-format json" in result.stdout and "--sizes" not in result.stdout


def test_bench_offers_linear() -> None:
    result = run("bench", "--help")
    assert "linear" in result.stdout


def test_block_size_is_an_alias_of_block() -> None:
    sizes = "surface_anchors=2,surface_queries=3,volume_anchors=2,volume_queries=3"
    a = run(
        "compile",
        "examples/ab_upt.pc",
        "--sizes",
        sizes,
        "--pattern",
        "joint",
        "--mask",
        "-",
        "--block-size",
        "2",
    )
    b = run(
        "compile", "examples/ab_upt.pc", "--sizes", sizes, "--pattern", "joint", "--mask", "-", "--block", "2"
    )
    assert a.returncode == 0 and a.stdout == b.stdout and "pattern joint" in a.stdout


def test_world_size_shows_the_sharding() -> None:
    sizes = "doc0=40,doc1=30,doc2=35,doc3=20"
    source = Path(__file__).parent / "golden" / "_docs.pc"
    source.write_text("groups doc*\ndoc* -> self [causal]\n")
    try:
        result = run("compile", str(source), "--sizes", sizes, "--world-size", "2")
    finally:
        source.unlink()
    assert result.returncode == 0, result.stderr
    assert "sharded over 2 ranks" in result.stdout
    assert "doc0: whole, 40 0" in result.stdout or "doc0: whole, 0 40" in result.stdout
    assert "call 0 local: `doc0 -> doc0[causal]`" in result.stdout
    assert "per forward, tokens received per rank: 0 0 (minimum 0 0)" in result.stdout
    missing = run("compile", "examples/ab_upt.pc", "--world-size", "2")
    assert missing.returncode == 2 and "--world-size needs --sizes" in missing.stderr
