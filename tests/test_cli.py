"""The command line: exit codes, messages, bad input, golden output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

from patternc.cli import main

GOLDEN = Path(__file__).parent / "golden"
AB = str(EXAMPLES / "ab_upt.patc")
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
    assert f"no pattern files (.patc or .pc) in {tmp_path}" in result.stderr  # a folder is searched
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
    assert "patternc compile examples/ab_upt.patc --pattern joint --format json" in result.stdout


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
    "ab_upt.txt": ["compile", "examples/ab_upt.patc"],
    "ab_upt.sizes.txt": ["compile", "examples/ab_upt.patc", "--sizes", AB_SIZES],
    "ab_upt.joint.json": ["compile", "examples/ab_upt.patc", "--pattern", "joint", "--format", "json"],
    "ab_upt.sizes.json": ["compile", "examples/ab_upt.patc", "--sizes", AB_SIZES, "--format", "json"],
    "ab_upt.dot": ["compile", "examples/ab_upt.patc", "--format", "dot"],
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
    files = sorted(str(p.relative_to(ROOT)) for p in EXAMPLES.glob("*.patc"))
    assert files
    result = run("check", *files)
    assert result.returncode == 0, result.stderr


def test_mask_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--sizes", AB_SIZES, "--pattern", "self_anchor", "--mask", "-"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "pattern self_anchor"
    # columns (the keys) carry the letters of the rows' groups, above each group's first cell
    assert lines[1] == "                  a   b               c   d"
    assert lines[2] == "surface_anchors a ####" + "." * 36
    assert lines[6] == "surface_queries b ####" + "." * 36
    assert lines[22] == " volume_anchors c " + "." * 20 + "####" + "." * 16
    assert "# full 640, + partial 0, . empty 5760 blocks (sparsity 0.900; 256 x 256 tokens per cell)" in out


def test_mask_as_text_shows_cached_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = "surface_anchors=cache,surface_queries=16,volume_anchors=8,volume_queries=16"
    assert main(["compile", AB, "--sizes", sizes, "--mask", "-", "--block", "8"]) == 0
    out = capsys.readouterr().out
    self_anchor = out.split("pattern ")[1].splitlines()
    assert self_anchor[1:5] == [
        "                  a bc  | d",
        "surface_queries a ..... | #",  # the queries read all of the cached surface anchors
        "                  ..... | #",
        " volume_anchors b ..#.. | .",
    ]
    assert "after |: keys read from the KV cache (d surface_anchors), one column each" in out
    causal = tmp_path / "cached.patc"
    causal.write_text("groups past now\npast -> self [causal]\nnow -> past[causal], now[causal]\n")
    assert main(["compile", str(causal), "--sizes", "past=cache,now=4", "--mask", "-", "--block", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == ["      a  | b", "now a +. | +", "      #+ | +"]


def test_mask_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    target = tmp_path / "mask.png"
    assert main(["compile", AB, "--sizes", AB_SIZES, "--mask", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {target}\n"
    # nothing is cut at the edges: titles (three lines each) and axis labels sit inside a white margin
    pixels = imread(target)
    height, width = pixels.shape[:2]
    assert width > 2 * height  # three panels side by side
    border = [pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:]]
    assert all(float(part[..., :3].min()) > 0.99 for part in border)
    assert float(pixels[8:40, :, :3].min()) < 0.5  # the titles are there, just inside


def test_mask_needs_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--mask", "-"]) == 2
    assert "--mask needs --sizes" in capsys.readouterr().err


def test_compile_reports_block_sparsity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", AB, "--sizes", AB_SIZES, "--pattern", "joint"]) == 0
    assert "blocks 128x128: 1280 full, 0 partial, 5120 empty; block sparsity 0.800" in capsys.readouterr().out


def test_bench_command() -> None:
    result = run(
        "bench",
        "examples/ab_upt.patc",
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
    result = run("bench", "examples/ab_upt.patc", "--sizes", "surface_anchors=8", "--pattern", "joint")
    assert result.returncode == 2 and "no size for" in result.stderr


def test_mask_and_a_plan_format_are_not_mixed() -> None:
    result = run("compile", "examples/ab_upt.patc", "--sizes", AB_SIZES, "--mask", "-", "--format", "json")
    assert result.returncode == 2
    assert "--mask draws the mask and --format json prints the plan" in result.stderr


def test_check_help_shows_check_examples() -> None:
    result = run("check", "--help")
    assert "--output-format json" in result.stdout and "--sizes" not in result.stdout


def test_bench_lists_linear_apart_and_only_on_request() -> None:
    """Linear attention computes another function: never ranked beside the softmax backends."""
    assert "`linear` on request" in run("bench", "--help").stdout
    sizes = "surface_anchors=4,surface_queries=8,volume_anchors=4,volume_queries=8"
    args = ("bench", "examples/ab_upt.patc", "--sizes", sizes, "--pattern", "joint", "--repeat", "1")
    result = run(*args, "--backend", "linear", "--backend", "batched")
    assert result.returncode == 0, result.stderr
    ranked, _, apart = result.stdout.partition("another function (linear attention: no softmax)")
    assert [line.split()[1] for line in ranked.splitlines() if line.startswith("joint")] == [
        "dense",
        "batched",
    ]
    (linear,) = [line.split() for line in apart.splitlines() if line.startswith("joint")]
    assert linear[1] == "linear" and float(linear[2]) > 0 and linear[3] == "-" and linear[5] == "-"


def test_block_size_is_an_alias_of_block() -> None:
    sizes = "surface_anchors=2,surface_queries=3,volume_anchors=2,volume_queries=3"
    common = ("compile", "examples/ab_upt.patc", "--sizes", sizes, "--pattern", "joint", "--mask", "-")
    a = run(*common, "--block-size", "2")
    b = run(*common, "--block", "2")
    assert a.returncode == 0 and a.stdout == b.stdout and "pattern joint" in a.stdout


def test_world_size_shows_the_sharding() -> None:
    sizes = "doc0=40,doc1=30,doc2=35,doc3=20"
    source = Path(__file__).parent / "golden" / "_docs.pc"
    source.write_text("groups doc*\ndoc* -> self [causal]\n")
    try:
        result = run("compile", str(source), "--sizes", sizes, "--world-size", "2")
        four = run("compile", str(source), "--sizes", sizes, "--world-size", "4")
    finally:
        source.unlink()
    # at 4 ranks doc0 is split over ranks 0 and 1: its halo runs between those two only,
    # sending rank 1 the keys before its middle (a ring would send all of rank 0's)
    assert four.returncode == 0, four.stderr
    assert "doc0: zigzag (ranks 0-1), 21 19 0 0" in four.stdout
    assert "call 0 halo over ranks 0, 1, 2 steps, blockwise kernel: `doc0 -> doc0[causal]`" in four.stdout
    assert "key/value tokens received per rank: 19 10 0 0 (minimum 19 10 0 0)" in four.stdout
    assert "strategy would move, all ranks: halo 29 (chosen), ring 40, gather 120" in four.stdout
    assert result.returncode == 0, result.stderr
    assert "sharded over 2 ranks" in result.stdout
    assert "doc0: whole, 40 0" in result.stdout or "doc0: whole, 0 40" in result.stdout
    assert "call 0 local: `doc0 -> doc0[causal]`" in result.stdout
    assert "per forward, tokens received per rank: 0 0 (minimum 0 0)" in result.stdout
    missing = run("compile", "examples/ab_upt.patc", "--world-size", "2")
    assert missing.returncode == 2 and "--world-size needs --sizes" in missing.stderr


# ---------------------------------------------------------------- folders, settings, fmt --diff

WARNED = "groups a b c\na, b -> a, b [causal]\nc -> self\n"
"""One warning: W102 on line 2."""


def _tree(root: Path) -> None:
    """Pattern files where a walk finds them and where it must not."""
    (root / "sub").mkdir()
    (root / "a.patc").write_text("groups a b\na -> b\nb -> a\n")
    (root / "sub" / "b.pc").write_text("groups b c\nb -> c\nc -> b\n")
    (root / "sub" / "notes.txt").write_text("not a pattern file")
    (root / "sub" / "zlib.pc").write_text("prefix=/usr\nName: zlib\nVersion: 1.3\nLibs: -lz\n")  # pkg-config
    for skipped in (".git", ".venv", "build", "node_modules"):
        (root / skipped).mkdir()
        (root / skipped / "x.patc").write_text("broken\n")


def test_check_walks_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path)
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{tmp_path / 'a.patc'}: ok (2 groups, 1 pattern(s))",
        f"{tmp_path / 'sub' / 'b.pc'}: ok (2 groups, 1 pattern(s))",
    ]
    (tmp_path / "sub" / "c.patc").write_text("groups c\nc -> d\n")
    assert main(["check", str(tmp_path), str(tmp_path / "a.patc")]) == 1  # a file named twice reads once
    captured = capsys.readouterr()
    assert "error[E201]: unknown group `d`" in captured.err
    assert captured.out.count("a.patc: ok") == 1


def test_a_file_given_by_name_is_read_whatever_its_extension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.txt"
    path.write_text("groups a\na -> a\n")
    assert main(["check", str(path)]) == 0
    assert "model.txt: ok" in capsys.readouterr().out


def test_a_folder_without_pattern_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 0
    assert capsys.readouterr().err == f"patternc: no pattern files (.patc or .pc) in {tmp_path}\n"


def test_compile_names_the_files_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path)
    assert main(["compile", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"`{tmp_path}` is a folder; this command reads one pattern file: {tmp_path / 'a.patc'}, " in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compile", str(empty)]) == 2
    assert "(it holds no .patc or .pc file)" in capsys.readouterr().err


def _settings(root: Path, table: str) -> None:
    (root / "pyproject.toml").write_text(f'[project]\nname = "demo"\n\n[tool.patternc]\n{table}\n')


def test_ignore_and_select_from_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "models" / "w.patc"
    source.parent.mkdir()
    source.write_text("groups a b c q\na, b -> a, b [causal]\nc -> self\nq -> a\n")  # W101 on q, W102
    assert main(["check", str(source)]) == 0
    captured = capsys.readouterr()
    assert "warning[W101]" in captured.err and "warning[W102]" in captured.err
    assert "2 warning(s)" in captured.out

    _settings(tmp_path, 'ignore = ["W101"]')
    assert main(["check", str(source)]) == 0
    captured = capsys.readouterr()
    assert "W101" not in captured.err and "warning[W102]" in captured.err
    assert "1 warning(s)" in captured.out
    assert main(["check", str(source), "--ignore", "W1"]) == 0  # the option replaces the table's list
    captured = capsys.readouterr()
    assert "warning" not in captured.err and captured.out.endswith("pattern(s))\n")
    assert main(["check", str(source), "--select", "W101", "--ignore", "W"]) == 0  # longest prefix wins
    captured = capsys.readouterr()
    assert "warning[W101]" in captured.err and "W102" not in captured.err
    assert main(["check", str(source), "--warnings-as-errors", "--ignore", "W"]) == 0
    capsys.readouterr()

    _settings(tmp_path, 'select = ["W102"]')
    source.write_text("groups a b c q\na, b -> a, b [causal]\nc -> self\nq -> x\n")  # and an error
    assert main(["check", str(source), "--output-format", "json"]) == 1
    codes = [d["code"] for d in json.loads(capsys.readouterr().out)]
    assert "E201" in codes and "W101" not in codes  # errors are always reported


def test_the_nearest_table_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pyproject.toml").write_text('[project]\nname = "inner"\n')  # no table: passed over
    _settings(tmp_path, 'ignore = ["W102"]')
    (inner / "w.patc").write_text(WARNED)
    assert main(["check", str(inner)]) == 0
    assert "W102" not in capsys.readouterr().err
    _settings(inner, 'ignore = ["W101"]')
    assert main(["check", str(inner)]) == 0
    assert "warning[W102]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('ignores = ["W101"]', "[tool.patternc] has no setting `ignores`; did you mean `ignore`?"),
        ("block_size = 64", "has no setting `block_size`; did you mean `block-size`?"),
        ('ignore = ["E201"]', "`E201` names errors, which cannot be ignored"),
        ('ignore = ["W11"]', "`W11` is no diagnostic code or prefix of one"),
        ('select = "W101"', 'select must be a list of codes, e.g. ["W101"]'),
        ("block-size = 0", "block-size must be a positive integer, got 0"),
        ("sizes = { a = -1 }", 'the size of `a` must be an integer >= 0 or "cache", got -1'),
        ("exclude = 3", "exclude must be a list of paths or globs"),
        ("select = [", "not valid TOML"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, message: str
) -> None:
    _settings(tmp_path, table)
    (tmp_path / "w.patc").write_text(WARNED)
    assert main(["check", str(tmp_path / "w.patc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"patternc: error: {tmp_path / 'pyproject.toml'}")
    assert message in err


def test_bad_codes_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", AB, "--ignore", "W1O1"]) == 2
    assert "--ignore: `W1O1` is no diagnostic code or prefix of one; did you mean `W101`?" in (
        capsys.readouterr().err
    )
    assert main(["check", AB, "--ignore", "E"]) == 2
    assert "`E` names errors, which cannot be ignored" in capsys.readouterr().err


def test_block_size_and_sizes_from_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = dict(item.split("=") for item in AB_SIZES.split(","))
    table = "block-size = 64\n\n[tool.patternc.sizes]\n" + "".join(f"{k} = {v}\n" for k, v in sizes.items())
    _settings(tmp_path, table + 'other_model_group = "cache"\n')
    source = tmp_path / "ab.patc"
    source.write_text((EXAMPLES / "ab_upt.patc").read_text())
    assert main(["compile", str(source), "--pattern", "joint"]) == 0
    captured = capsys.readouterr()
    assert "blocks 64x64: 5120 full, 0 partial, 20480 empty" in captured.out
    assert "surface_queries  1024    4096" in captured.out  # the layout at the table's sizes
    assert captured.err == f"patternc: sizes from [tool.patternc.sizes] of {tmp_path / 'pyproject.toml'}\n"
    small = "surface_anchors=2,surface_queries=3,volume_anchors=2,volume_queries=3"
    assert main(["compile", str(source), "--pattern", "joint", "--sizes", small, "--block", "2"]) == 0
    captured = capsys.readouterr()
    assert "blocks 2x2:" in captured.out and captured.err == ""  # options win over the table
    source.write_text("groups a b\na, b -> a, b\n")  # groups the table does not size: no layout
    assert main(["compile", str(source), "--ignore", "W"]) == 0
    assert "layout:" not in capsys.readouterr().out


def test_exclude_from_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path)
    _settings(tmp_path, 'exclude = ["sub/b.pc", "*.patc"]')
    assert main(["check", str(tmp_path)]) == 0
    assert capsys.readouterr().err == f"patternc: no pattern files (.patc or .pc) in {tmp_path}\n"


def test_without_a_toml_reader_the_table_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.10 without tomli: settings are not read, and the user is told why."""
    import patternc.project

    monkeypatch.setattr(patternc.project, "_toml_module", lambda: None)
    _settings(tmp_path, 'ignore = ["W102"]')
    (tmp_path / "w.patc").write_text(WARNED)
    assert main(["check", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "[tool.patternc] not read: Python 3." in err and "pip install tomli" in err
    assert "warning[W102]" in err


def test_fmt_diff_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.patc"
    messy = "groups a b\na->a,b[causal]\nb  ->  b\n"
    path.write_text(messy)
    assert main(["fmt", "--diff", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert path.read_text() == messy
    assert out.splitlines() == [
        f"--- {path} (original)",
        f"+++ {path} (formatted)",
        "@@ -1,3 +1,3 @@",
        " groups a b",
        "-a->a,b[causal]",
        "-b  ->  b",
        "+a -> a, b[causal]",
        "+b -> b",
    ]
    assert main(["fmt", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"reformatted {path}\n"
    assert main(["fmt", "--diff", str(path)]) == 0
    assert capsys.readouterr().out == ""


def test_fmt_diff_of_stdin() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "patternc", "fmt", "--diff", "-"],
        input="groups a\na->a\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--- <stdin> (original)\n+++ <stdin> (formatted)\n" in result.stdout
    assert "-a->a\n+a -> a\n" in result.stdout


def test_a_str_naming_a_pattern_file_is_refused_for_either_extension() -> None:
    import patternc
    from patternc.diagnostics import PatternError

    for name in ("model.patc", "model.pc"):
        with pytest.raises(PatternError) as info:
            patternc.compile(name)
        (diagnostic,) = info.value.diagnostics
        assert diagnostic.code == "E006" and f"pathlib.Path({name!r})" in (diagnostic.hint or "")
