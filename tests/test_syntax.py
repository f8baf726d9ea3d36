"""The language: layout, selectors, syntax errors with locations."""

from __future__ import annotations

import pytest
from conftest import codes, diagnostics_of

import patternc
from patternc.diagnostics import Diagnostic
from patternc.syntax import Difference, SelectorUnion, Word, parse


def patterns_of(source: str, name: str = "default") -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    plan = patternc.compile(source).patterns[name]
    return [(p.query_tokens, p.key_value_tokens) for p in plan.attention_patterns]


def test_comments_blank_lines_and_free_layout() -> None:
    src = """
    # leading comment

       groups a b   c   # trailing comment


    pattern p {   # comment after brace

        a, b -> a      # rule comment
        c -> c
    }
    """
    assert patterns_of(src, "p") == [(("a", "b"), ("a",)), (("c",), ("c",))]


def test_top_level_rules_form_default_pattern() -> None:
    assert list(patternc.compile("groups a b\na -> b\nb -> a").patterns) == ["default"]


def test_semicolons_and_one_line_blocks() -> None:
    src = "groups a b; pattern p { a -> a; b -> b }; pattern q { * -> a }"
    program = patternc.compile(src)
    assert list(program.patterns) == ["p", "q"]
    assert patterns_of(src, "q") == [(("a", "b"), ("a",))]


def test_continuation_after_operators_and_backslash() -> None:
    src = "groups a b c\na,\n  b ->\n  a, c\nc -> \\\n  c\n"
    assert patterns_of(src) == [(("a", "b"), ("a", "c")), (("c",), ("c",))]


def test_multiple_groups_statements_append() -> None:
    assert patternc.compile("groups a b\ngroups c\n* -> *").groups == ("a", "b", "c")


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("*", ("sa", "sq", "va", "vq")),
        ("s*", ("sa", "sq")),
        ("?a", ("sa", "va")),
        ("*a", ("sa", "va")),
        ("sa, vq", ("sa", "vq")),
        ("vq, sa", ("sa", "vq")),  # declaration order, not selector order
        ("* - vq", ("sa", "sq", "va")),
        ("* - s*, vq", ("va",)),  # ',' binds tighter than '-'
        ("* - s* - vq", ("va",)),  # '-' is left associative
        ("(* - s*), sq", ("sq", "va", "vq")),
        ("(sa, sq), sa", ("sa", "sq")),
    ],
)
def test_selectors(selector: str, expected: tuple[str, ...]) -> None:
    plan = patternc.compile(f"groups sa sq va vq\n* -> {selector}").patterns["default"]
    assert plan.attention_patterns[0].key_value_tokens == expected


def test_syntax_tree_keeps_spans() -> None:
    tree = parse("groups a b\na, b -> * - b\n")
    rule = tree.top_level_rules[0]
    assert isinstance(rule.queries, SelectorUnion)
    assert isinstance(rule.keys_values, Difference)
    assert isinstance(rule.keys_values.left, Word) and rule.keys_values.left.is_glob
    assert (rule.span.line, rule.span.column) == (2, 1)
    assert rule.text == "a, b -> * - b"
    assert [(g.name, g.span.column) for g in tree.groups] == [("a", 8), ("b", 10)]


def test_syntax_error_reports_what_was_expected_and_where() -> None:
    (diag,) = diagnostics_of("groups a b\na b -> a\n")
    assert diag.code == "E010"
    assert (diag.line, diag.column) == (2, 3)
    assert "unexpected `b`" in diag.message and "`->`" in diag.message
    assert diag.hint is not None and "QUERIES -> KEYS_VALUES" in diag.hint


def test_every_syntax_error_is_reported() -> None:
    diags = diagnostics_of("groups a b\na b -> a\nb -> -> a\na -> b\nb %% a\n")
    assert codes(diags) == ["E010", "E010", "E010"]
    assert [d.line for d in diags] == [2, 3, 5]


def test_missing_closing_brace() -> None:
    diags = diagnostics_of("groups a\npattern p {\n a -> a\n")
    assert codes(diags) == ["E010"]
    assert "end of file" in diags[0].message
    assert diags[0].hint is not None and "closing `}`" in diags[0].hint


def test_missing_selector_has_hint() -> None:
    (diag,) = diagnostics_of("groups a\na ->;\n")
    assert diag.code == "E010" and diag.line == 2
    assert diag.hint is not None and "selector is missing" in diag.hint


def test_unexpected_character() -> None:
    (diag,) = diagnostics_of("groups a\na -> a@b\n")
    assert diag.code == "E010"
    assert "unexpected character `@`" in diag.message
    assert (diag.line, diag.column) == (2, 7)


def test_a_dot_outside_a_family_part_is_a_bad_name() -> None:
    diag = diagnostics_of("groups a\na -> a.b\n")[0]
    assert diag.code == "E011" and "`a.b` is not a valid group name" in diag.message
    assert diag.hint is not None and "groups doc*{prefix, text}" in diag.hint


def test_bad_names() -> None:
    diags = diagnostics_of("groups 1abc a*b self\n* -> *\n")
    assert codes(diags)[:3] == ["E011", "E011", "E012"]
    assert "`1abc` is not a valid group name" in diags[0].message
    assert diags[1].hint is not None and "globs belong in rules" in diags[1].hint
    assert "family" in diags[1].hint and "`doc*`" in diags[1].hint
    assert "`self` is reserved" in diags[2].message


def test_bad_name_in_rule() -> None:
    diags = diagnostics_of("groups a\na -> 9a\n")
    assert "E011" in codes(diags)


def test_bad_pattern_name() -> None:
    diags = diagnostics_of("groups a\npattern 2p { a -> a }\n")
    assert codes(diags) == ["E011"]
    assert "not a valid pattern name" in diags[0].message


def test_types_block() -> None:
    program = patternc.compile(
        "groups surface_anchors surface_queries volume_anchors wake_queries\n"
        "types {\n  fluid: volume_*, wake_queries\n}\n* -> *_anchors\n"
    )
    assert program.types == {
        "surface_anchors": "surface",  # default: the domain
        "surface_queries": "surface",
        "volume_anchors": "fluid",
        "wake_queries": "fluid",
    }
    assert program.type_names == ("surface", "fluid")
    assert program.patterns["default"].types == program.types


def test_types_block_errors() -> None:
    diags = diagnostics_of("groups a b\ntypes {\n  x: a\n  y: *\n  z: c\n  2w: b\n}\n* -> *\n")
    assert codes(diags) == ["E107", "E201", "E011", "E107"]  # `*` gave `b` a type too
    assert diags[0].message == "group `a` is given two types: `x` (line 3) and `y`"
    assert diags[0].line == 4
    assert "not a valid type name" in diags[2].message


# Fuzzing of the parser and checks lives in tests/fuzz/ (grammar-aware, seeded in CI).


# ------------------------------------------------------------ hints that name the fix


def fixed(diag: Diagnostic, source: str) -> str:
    """The source with the diagnostic's fix applied (it must have one)."""
    assert diag.fix is not None, diag
    return diag.fix.apply(source)


@pytest.mark.parametrize(
    ("line", "column", "message", "written"),
    [
        (
            "a, b -> a [causal, window=256]",
            26,
            "unexpected character `=` in a modifier list",
            "[causal, window 256]",
        ),
        (
            "a, b -> a [causal window 256]",
            26,
            "unexpected `256`; expected `,` or `]`",
            "[causal, window 256]",
        ),
        ("a, b -> a [window: 8]", 18, "unexpected `:`", "[window 8]"),
        ("a, b -> a [causal; window 3]", 18, "unexpected `;`", "[causal, window 3]"),
        (
            "a, b -> a, b[window = 4, causal]",
            21,
            "unexpected character `=` in a modifier list",
            "[window 4, causal]",
        ),
    ],
)
def test_modifier_list_errors_name_the_list_as_it_should_read(
    line: str, column: int, message: str, written: str
) -> None:
    source = f"groups a b\n{line}\n"
    (diag,) = diagnostics_of(source)
    assert diag.code == "E010" and (diag.line, diag.column) == (2, column)
    assert message in diag.message
    assert diag.hint is not None and "group names" not in diag.hint
    assert f"write `{written}`" in diag.hint
    assert written in fixed(diag, source)
    patternc.compile(fixed(diag, source))


def test_modifier_list_without_a_clear_repair_shows_the_forms() -> None:
    (diag,) = diagnostics_of("groups a\na -> a [causal; sliding 3]\n")
    assert diag.hint == "modifiers read `[causal]`, `[window 256]` or `[causal, window 256]`"
    assert diag.fix is None


def test_unclosed_modifier_list_is_closed_by_its_fix() -> None:
    source = "groups a\na -> a [causal\n"
    (diag,) = diagnostics_of(source)
    assert diag.hint == "close the modifier list: `[causal]`"
    assert fixed(diag, source) == "groups a\na -> a [causal]\n"


@pytest.mark.parametrize("arrow", ["=>", "\u2192"])
def test_a_wrong_arrow_is_named(arrow: str) -> None:
    source = f"groups a b\na -> a\nb {arrow} a\n"
    (diag,) = diagnostics_of(source)
    assert diag.code == "E010" and (diag.line, diag.column) == (3, 3)
    assert diag.message == f"`{arrow}` is not an arrow"
    assert diag.hint == "a rule reads `QUERIES -> KEYS_VALUES`: write `->`"
    assert fixed(diag, source) == "groups a b\na -> a\nb -> a\n"


def test_commas_in_the_groups_line_are_one_error_and_declare_the_groups() -> None:
    source = "groups a, b,c\na -> b, c\nb, c -> a\n"
    (diag,) = diagnostics_of(source)  # no unknown-group cascade: a, b, c are declared
    assert diag.code == "E010" and (diag.line, diag.column) == (1, 9)
    assert diag.message == "group names are separated by spaces, not `,`"
    assert diag.hint == "write `groups a b c`"
    assert fixed(diag, source) == "groups a b c\na -> b, c\nb, c -> a\n"
    assert patternc.compile(fixed(diag, source)).groups == ("a", "b", "c")


@pytest.mark.parametrize(
    ("typo", "keyword"), [("gruops", "groups"), ("Groups", "groups"), ("patern", "pattern")]
)
def test_a_misspelt_keyword_is_one_error_without_a_cascade(typo: str, keyword: str) -> None:
    body = "a -> b\nb -> a\n" if keyword == "groups" else "p {\n  a -> b\n  b -> a\n}\n"
    source = f"{typo} a b\n{body}" if keyword == "groups" else f"groups a b\n{typo} {body}"
    (diag,) = diagnostics_of(source)
    assert diag.code == "E010" and diag.message == f"unknown keyword `{typo}`"
    assert diag.hint is not None and diag.hint.startswith(f"did you mean `{keyword}`?")
    patternc.compile(fixed(diag, source))


def test_unknown_modifier_fix_renames_it() -> None:
    source = "groups a\na -> a [casual]\n"
    (diag,) = diagnostics_of(source)
    assert diag.hint == "did you mean `causal`?"
    assert fixed(diag, source) == "groups a\na -> a [causal]\n"
