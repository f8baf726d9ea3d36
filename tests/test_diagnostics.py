"""Diagnostics like a compiler's: per-key modifiers and their errors, one
meaning per code (checked against docs/language.md), per-statement syntax
recovery, the warning tier, JSON output, and exports that keep their meaning."""

from __future__ import annotations

import ast
import difflib
import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, codes, diagnostics_of

import patternc
from patternc.diagnostics import (
    LINE_WINDOW,
    MAX_SHOWN,
    MAX_SHOWN_PER_LINE,
    MEANINGS,
    Code,
    NameIndex,
    closest,
    render,
)
from patternc.modifiers import Modifiers

# ---------------------------------------------------------------- codes


def test_every_code_has_one_meaning_listed_in_the_docs() -> None:
    constants = {v for k, v in vars(Code).items() if k.isupper()}
    assert constants == set(MEANINGS), "every code has a meaning and every meaning a code"
    assert len(constants) == len([k for k in vars(Code) if k.isupper()]), "no code is reused"
    table = (ROOT / "docs" / "language.md").read_text()
    rows = dict(re.findall(r"^\| ([EW]\d{3}) \| (.+) \|$", table, re.MULTILINE))
    assert rows == MEANINGS


def test_the_package_emits_only_codes_of_the_table() -> None:
    """No literal code strings outside the table: every emitted code is a ``Code`` constant."""
    for path in (ROOT / "patternc").rglob("*.py"):
        if path.name == "diagnostics.py":
            continue
        literal = re.findall(r"[\"']([EW]\d{3})[\"']", path.read_text())
        assert not literal, f"{path} spells codes {literal}; use Code.*"


# ---------------------------------------------------------------- per-key modifiers


def keys_of(source: str, pattern: str = "default") -> dict[tuple[str, ...], list[tuple[str, Modifiers]]]:
    plan = patternc.compile(source).patterns[pattern]
    return {rule.queries: [(k.name, k.modifiers) for k in rule.keys] for rule in plan.rules}


CAUSAL = Modifiers(causal=True)


def test_per_key_modifiers_apply_to_their_selector_only() -> None:
    rules = keys_of("groups r image text\nr, image -> r, image\ntext -> r, image, text[causal]\n")
    assert rules[("text",)] == [("r", Modifiers()), ("image", Modifiers()), ("text", CAUSAL)]


def test_rule_level_modifiers_apply_to_every_key_and_warn() -> None:
    program = patternc.compile("groups image text\nimage -> image\ntext -> image, text [causal]\n")
    rules = {r.queries: [k.modifiers for k in r.keys] for r in program.patterns["default"].rules}
    assert rules[("text",)] == [CAUSAL, CAUSAL]
    (warning,) = program.warnings
    assert warning.code == "W102" and (warning.line, warning.column) == (3, 21)
    assert warning.hint is not None and "`... text[causal]`" in warning.hint


def test_modifiers_on_a_parenthesised_selector_and_globs() -> None:
    rules = keys_of("groups a b c\na, b -> a, b\nc -> (a, b)[window 3], c\n")
    assert rules[("c",)] == [("a", Modifiers(window=3)), ("b", Modifiers(window=3)), ("c", Modifiers())]
    rules = keys_of("groups t_a t_b x\nt_a, t_b -> *\nx -> *, t_*[causal]\n")
    assert rules[("x",)] == [("t_a", CAUSAL), ("t_b", CAUSAL), ("x", Modifiers())]


def test_calls_merge_only_with_equal_per_key_modifiers() -> None:
    plan = patternc.compile("groups a b c\na -> a, b[causal]\nb -> a, b[causal]\nc -> a, b\n").patterns[
        "default"
    ]
    assert [c.queries for c in plan.calls] == [("a", "b"), ("c",)]


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("groups a\na -> a [casual]\n", "E020", "unknown modifier `casual`"),
        ("groups a\na -> a [causal 3]\n", "E021", "`causal` takes no argument"),
        ("groups a\na -> a [window]\n", "E021", "`window` needs a number of tokens"),
        ("groups a\na -> a [window -3]\n", "E021", "`window` must be at least 1, got -3"),
        ("groups a\na -> a [window 0]\n", "E021", "`window` must be at least 1, got 0"),
        ("groups a\na -> a [window 1.5]\n", "E021", "`window` needs a whole number of tokens, got `1.5`"),
        ("groups a\na -> a [window x]\n", "E021", "`window` needs a whole number of tokens, got `x`"),
        ("groups a\na -> a [causal, causal]\n", "E022", "`causal` given twice"),
        ("groups a\na -> a [window 4, window 8]\n", "E022", "two windows (4 and 8)"),
        ("groups a\na -> a[causal] [causal]\n", "E023", "`a` has modifiers [causal] here and [causal]"),
        ("groups a b\na, b -> a[causal], a[window 2], b\n", "E023", "`a` is given modifiers twice"),
        ("groups a\na[causal] -> a\n", "E024", "modifiers [causal] mean nothing in this side"),
        ("groups a b\na, b -> * - b[causal]\n", "E024", "mean nothing in an exclusion"),
        ("groups a\ntypes { t: a[causal] }\na -> a\n", "E024", "mean nothing in this side"),
    ],
)
def test_modifier_errors_have_their_own_codes(source: str, code: str, message: str) -> None:
    (diag,) = [d for d in diagnostics_of(source) if d.is_error]
    assert diag.code == code
    assert message in diag.message
    assert diag.span is not None


def test_modifier_error_points_at_the_argument() -> None:
    (diag,) = diagnostics_of("groups a\na -> a [window -3]\n")
    assert (diag.line, diag.column) == (2, 16)


# ---------------------------------------------------------------- recovery, hints, grouping


def test_syntax_errors_recover_per_statement() -> None:
    source = (
        "groups a b c\n"
        "pattern p {\n"
        "  a -> ,\n"  # syntax error: left out, p's exhaustiveness not judged
        "  b, c -> b\n"
        "}\n"
        "pattern q {\n"
        "  a, b -> zz\n"  # still checked: unknown group
        "}\n"
    )
    diags = diagnostics_of(source)
    assert codes(diags) == ["E010", "E301", "E201"]
    assert [d.line for d in diags] == [3, 6, 7]
    assert "`c`" in diags[1].message


def test_several_syntax_errors_and_a_check_error_in_one_run() -> None:
    diags = diagnostics_of("groups a b\na -> (a\nb -> b b\nb -> zz\n")
    assert codes(diags) == ["E010", "E010", "E201"]


def test_unclosed_block_reports_syntax_only() -> None:
    diags = diagnostics_of("groups a\npattern p {\n  a -> a\n")
    assert codes(diags) == ["E010"]


@pytest.mark.parametrize("word", ["self", "pattern", "groups", "types"])
def test_hints_never_propose_reserved_words(word: str) -> None:
    groups = f"groups {word}s {word}x\n"  # names close to a reserved word
    diags = diagnostics_of(groups + f"{word}s, {word}x -> {word}z\n")
    for diag in diags:
        assert f"`{word}`" not in (diag.hint or ""), diag


def test_reserved_words_are_not_group_names() -> None:
    diags = diagnostics_of("groups a self\na -> a\n")
    assert codes(diags)[0] == "E012"


def test_caret_lines_count_only_newlines() -> None:
    source = "groups a b\n\x0c\na -> zz\nb -> b\n"
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source, filename="f.pc")
    (diag,) = info.value.diagnostics
    assert diag.line == 3
    assert "    a -> zz\n" in str(info.value)


# ---------------------------------------------------------------- warnings


def test_never_a_key_warning_and_noqa() -> None:
    program = patternc.compile("groups anchors queries\n* -> anchors\n")
    assert [w.code for w in program.warnings] == ["W101"]
    assert "`queries`" in program.warnings[0].message
    silenced = patternc.compile("groups anchors queries  # noqa: W101\n* -> anchors\n")
    assert silenced.warnings == ()
    other_code = patternc.compile("groups anchors queries  # noqa: W102\n* -> anchors\n")
    assert [w.code for w in other_code.warnings] == ["W101"]


def test_full_attention_warning() -> None:
    program = patternc.compile("groups a b\n* -> *\n")
    assert [w.code for w in program.warnings] == ["W103"]
    assert patternc.compile("groups a b\n* -> * [causal]  # noqa\n").warnings == ()


def test_warnings_do_not_hide_behind_errors() -> None:
    """Errors raise with the warnings found beside them (in ``diagnostics`` too)."""
    source = "groups a b q  # q only reads\na, b -> a, b [causal, window 0]\nq -> a\n"
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source)
    assert codes(list(info.value.diagnostics)) == ["W101", "E021"]
    assert codes(list(info.value.warnings)) == ["W101"]
    assert str(info.value).endswith("1 error, 1 warning")


def test_warnings_an_error_makes_doubtful_are_left_out() -> None:
    """A selector that failed to resolve may have named the group W101 is
    about; a rule with an error is not judged for W102; a group in no rule
    at all is a rule still to write (E301 says so)."""
    assert codes(diagnostics_of("groups a b\na -> zz\nb -> b\n")) == ["E201"]
    assert codes(diagnostics_of("groups a b c\nc -> a, c\na, b -> a, b [causal, casual]\n")) == ["E020"]
    assert codes(diagnostics_of("groups a b c\na, b -> a\n")) == ["W101", "E301"]  # b: a query, never a key


def test_the_per_key_form_of_a_rule_modifier_is_a_fix() -> None:
    source = "groups image text\nimage -> image\ntext -> image, text [causal]\n"
    (warning,) = patternc.compile(source).warnings
    assert warning.fix is not None and warning.fix.title == "put [causal] on `text` only"
    moved = warning.fix.apply(source)
    assert moved == "groups image text\nimage -> image\ntext -> image, text[causal]\n"
    assert patternc.compile(moved).warnings == ()
    (unfixable,) = patternc.compile("groups a b c\nc -> c\na, b -> * - c [causal]\n").warnings
    assert unfixable.code == "W102" and unfixable.fix is None


# ---------------------------------------------------------------- the CLI


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patternc", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_check_json_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pc"
    bad.write_text("groups a b\na -> a [window -3]\nb -> zz\n")
    result = run("check", str(bad), "--output-format", "json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert [d["code"] for d in data] == ["E021", "E201"]
    first = data[0]
    assert set(first) == {"code", "severity", "message", "file", "where", "start", "end", "hint", "fix"}
    assert first["severity"] == "error" and first["file"] == str(bad)
    assert first["start"] == {"line": 2, "column": 16} and first["end"] == {"line": 2, "column": 18}


def test_warnings_exit_zero_unless_warnings_as_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.pc"
    path.write_text("groups image text\nimage -> image\ntext -> image, text [causal]\n")
    result = run("check", str(path))
    assert result.returncode == 0
    assert "warning[W102]" in result.stderr and "1 warning(s)" in result.stdout
    assert run("check", str(path), "--warnings-as-errors").returncode == 1
    data = json.loads(run("check", str(path), "--output-format", "json").stdout)
    assert [(d["code"], d["severity"]) for d in data] == [("W102", "warning")]


def test_check_reports_an_error_and_a_warning_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "both.pc"
    path.write_text("groups a b q\na, b -> a, b\nq -> a [casual]\n")
    result = run("check", str(path))
    assert result.returncode == 1
    assert "warning[W101]: no rule lets anyone attend to `q`" in result.stderr
    assert "error[E020]: unknown modifier `casual`" in result.stderr
    assert result.stderr.rstrip().endswith("1 error, 1 warning")
    data = json.loads(run("check", str(path), "--output-format", "json").stdout)
    assert [(d["code"], d["severity"]) for d in data] == [("W101", "warning"), ("E020", "error")]
    assert data[1]["fix"] == {
        "title": "replace `casual` by `causal`",
        "edits": [
            {"start": {"line": 3, "column": 9}, "end": {"line": 3, "column": 15}, "replacement": "causal"}
        ],
    }


# ---------------------------------------------------------------- exports keep their meaning


def test_attention_patterns_refuse_to_drop_modifiers() -> None:
    plan = patternc.compile("groups a\na -> a [causal]\n").patterns["default"]
    with pytest.raises(ValueError, match="pass the plan itself"):
        plan.attention_patterns  # noqa: B018
    plain = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    assert [p.key_value_tokens for p in plain.attention_patterns] == [("a",)]


def test_a_str_naming_a_file_is_refused_with_a_hint() -> None:
    path = str(ROOT / "examples" / "ab_upt.patc")
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(path)
    (diag,) = info.value.diagnostics
    assert diag.code == "E006"
    assert diag.hint is not None and "pathlib.Path(" in diag.hint
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile("examples/missing.pc")
    assert info.value.diagnostics[0].code == "E006"


# ---------------------------------------------------------------- output in proportion


def rendered(source: str) -> str:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source, filename="f.pc")
    return str(info.value)


def test_a_long_line_is_shown_as_a_window_around_the_caret() -> None:
    text = rendered("groups a\na -> a" + " " * 5_000 + "zz\n")
    header, line, caret, *_ = text.splitlines()
    assert (
        header
        == "f.pc:2:5007: error[E010]: unexpected `zz`; expected `,`, `-`, `;`, `[`, end of file or end of line"
    )
    assert line.startswith("    ...") and line.endswith("zz")
    assert len(line) < LINE_WINDOW + 10
    assert caret.index("^") == line.index("zz") and caret.endswith("^~")


def test_diagnostics_per_line_and_per_file_are_capped_with_a_count() -> None:
    one_line = rendered("groups a\na -> a [" + ", ".join(["causal"] * 40) + "]\n")
    assert one_line.count("error[E022]") == MAX_SHOWN_PER_LINE
    assert f"... and {39 - MAX_SHOWN_PER_LINE} more on line 2" in one_line
    assert one_line.endswith("39 errors")
    many_lines = rendered("groups a\na -> a\n" + "zz -> a\n" * (MAX_SHOWN + 7))
    assert many_lines.count("error[E201]") == MAX_SHOWN
    assert many_lines.endswith(f"... and 7 more not shown\n{MAX_SHOWN + 7} errors")


def test_render_without_limits_shows_everything() -> None:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile("groups a\na -> a [" + ", ".join(["causal"] * 40) + "]\n")
    text = render(info.value.diagnostics, source=info.value.source, max_shown=None, max_per_line=None)
    assert text.count("error[E022]") == 39 and "more" not in text


def test_did_you_mean_is_cheap_among_many_names() -> None:
    names = [f"group_{i}_x" for i in range(18_000)]
    index = NameIndex(names)
    start = time.perf_counter()
    answers = [index.closest(f"grop_{i}_x") for i in range(0, 18_000, 180)]
    per_name = (time.perf_counter() - start) / len(answers)
    assert answers == [f"group_{i}_x" for i in range(0, 18_000, 180)]
    assert per_name < 0.02, f"{per_name * 1e3:.1f} ms per name"  # a full difflib pass takes ~0.2 s


def test_did_you_mean_stops_after_its_budget() -> None:
    index = NameIndex(["alpha", "beta"], budget=2)
    assert [index.closest(n) for n in ("alpah", "betta", "alpah", "bta")] == ["alpha", "beta", "alpha", None]


@pytest.mark.parametrize(
    "pool", [["surface_anchors", "volume_anchors", "wake"], [f"g{i}" for i in range(300)]]
)
def test_name_index_agrees_with_difflib(pool: list[str]) -> None:
    for name in ("volume_anchor", "surfac_anchors", "wak", "g17", "g1x", "nothing_alike"):
        expected = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
        assert closest(name, pool) == (expected[0] if expected else None)


def test_pattern_errors_pickle_with_their_diagnostics() -> None:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile("groups a\na -> zz\n", filename="f.pc")
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.diagnostics == info.value.diagnostics and str(copy) == str(info.value)


def test_lint_does_not_import_the_compiler() -> None:
    """compiler imports lint; lint reads DEFAULT_PATTERN from syntax, below both."""
    tree = ast.parse((ROOT / "patternc" / "lint.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "patternc.compiler" not in imported
    from patternc.compiler import DEFAULT_PATTERN

    assert DEFAULT_PATTERN == "default"
