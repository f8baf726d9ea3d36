"""Checks on the token-group graph: each with its code, location and hint."""

from __future__ import annotations

import pytest
from conftest import codes, diagnostics_of

import patternc
from patternc import AttentionPattern, TokenSpec, check_patterns
from patternc.diagnostics import Diagnostic

AB = "groups surface_anchors surface_queries volume_anchors volume_queries\n"


def errors_of(source: str) -> list[Diagnostic]:
    """The errors of text that must fail (the warnings found beside them aside)."""
    return [d for d in diagnostics_of(source) if d.is_error]


def test_unknown_group_did_you_mean() -> None:
    (diag,) = diagnostics_of(AB + "surface_* -> surface_anchors\nvolume_* -> volume_anchor\n")
    assert diag.code == "E201"
    assert diag.message == "unknown group `volume_anchor`"
    assert (diag.line, diag.column) == (3, 13)
    assert diag.hint == "did you mean `volume_anchors`?"


def test_unknown_group_without_close_match() -> None:
    (diag,) = diagnostics_of("groups a b\n* -> zzz_qqq\n")
    assert diag.code == "E201"
    assert diag.hint is not None and "declare it" in diag.hint


def test_glob_matching_nothing() -> None:
    (diag,) = diagnostics_of(AB + "* -> fluid_*\n")
    assert diag.code == "E202"
    assert diag.message == "glob `fluid_*` matches no group"
    assert (diag.line, diag.column) == (2, 6)
    assert diag.hint is not None and "`surface_anchors`" in diag.hint


def test_exclusion_selecting_nothing() -> None:
    (diag,) = diagnostics_of("groups a b\n* -> a - a\n")
    assert diag.code == "E203"
    assert "key/value side" in diag.message
    assert (diag.line, diag.column) == (2, 6)


def test_not_exhaustive_points_at_pattern() -> None:
    (diag,) = errors_of(
        AB + "pattern self_anchor {\n  surface_* -> surface_anchors\n  volume_anchors -> volume_anchors\n}\n"
    )
    assert diag.code == "E301"
    assert diag.message == "group `volume_queries` is a query in no rule of pattern `self_anchor`"
    assert (diag.line, diag.column) == (2, 9)
    assert diag.hint is not None and "`volume_queries -> ...`" in diag.hint


def test_not_exhaustive_default_pattern_points_at_group() -> None:
    (diag,) = errors_of("groups a b c\na, b -> a\n")
    assert diag.code == "E301"
    assert (diag.line, diag.column) == (1, 12)


def test_overlap_names_both_rules() -> None:
    (diag,) = errors_of(
        AB + "surface_* -> surface_anchors\nvolume_* -> volume_anchors\nsurface_queries -> volume_anchors\n"
    )
    assert diag.code == "E302"
    assert "`surface_queries`" in diag.message
    assert "line 2 (`surface_* -> surface_anchors`)" in diag.message
    assert "line 4 (`surface_queries -> volume_anchors`)" in diag.message
    assert (diag.line, diag.column) == (4, 1)
    assert diag.hint is not None and "surface_queries -> surface_anchors, volume_anchors" in diag.hint


def test_duplicate_groups_and_patterns() -> None:
    diags = errors_of("groups a b a\npattern p { * -> * }\npattern p { * -> a }\n")
    assert codes(diags) == ["E101", "E103"]
    assert diags[0].message == "group `a` is declared twice (first at line 1)"
    assert (diags[0].line, diags[0].column) == (1, 12)
    assert diags[1].message == "pattern `p` is declared twice (first at line 2)"
    assert diags[1].line == 3


def test_no_groups() -> None:
    diags = diagnostics_of("# nothing but a comment\n")
    assert codes(diags) == ["E102"]
    assert diags[0].hint is not None and "groups NAME" in diags[0].hint


def test_empty_file() -> None:
    (diag,) = diagnostics_of("  \n\n")
    assert diag.code == "E004" and diag.message == "the pattern file is empty"


def test_groups_but_no_rules() -> None:
    (diag,) = diagnostics_of("groups a b\n")
    assert diag.code == "E104"


def test_empty_pattern_block() -> None:
    diags = errors_of("groups a\npattern p {\n}\npattern q { a -> a }\n")
    assert codes(diags) == ["E105"]
    assert diags[0].message == "pattern `p` has no rules" and diags[0].line == 2


def test_rules_outside_blocks_with_named_patterns() -> None:
    diags = errors_of("groups a\na -> a\npattern p { a -> a }\n")
    assert codes(diags) == ["E106"]
    assert diags[0].line == 2
    assert diags[0].hint is not None and "pattern default" in diags[0].hint


def test_all_problems_reported_at_once_in_source_order() -> None:
    src = (
        "groups a b c a\n"  # duplicate a
        "pattern p {\n"
        "  a -> bb\n"  # unknown
        "  b -> x*\n"  # glob matches nothing
        "}\n"
        "pattern q {\n"
        "  a, b -> a\n"
        "  b -> c\n"  # overlap; c not exhaustive
        "}\n"
    )
    diags = diagnostics_of(src)
    # p's failing selectors are all on the key side: `c` is still missing from p
    assert codes(diags) == ["E101", "E301", "E201", "E202", "E301", "E302"]
    assert [d.line for d in diags] == [1, 2, 3, 4, 6, 8]


def test_misspelt_query_suppresses_only_the_group_it_meant() -> None:
    # `volume_querie` meant `volume_queries`: that group's E301 would repeat the
    # E201; the unrelated missing `surface_queries` is still reported
    diags = diagnostics_of(AB + "surface_anchors -> surface_anchors\nvolume_anchors, volume_querie -> *\n")
    assert codes(diags) == ["E301", "E201"]
    assert "`surface_queries`" in diags[0].message and "volume_queries" not in diags[0].message


def test_unknown_query_with_no_close_name_suppresses_nothing() -> None:
    diags = diagnostics_of("groups a b\nb -> a\nx -> a\n")
    assert codes(diags) == ["E301", "E201"]


def test_missing_groups_are_one_diagnostic() -> None:
    (diag,) = diagnostics_of("groups a b c d\npattern p {\n  a -> a\n}\n")
    assert diag.code == "E301"
    assert diag.message == "3 groups are a query in no rule of pattern `p`: `b`, `c`, `d`"
    assert diag.hint is not None and "`b, c, d -> ...`" in diag.hint


def test_error_renders_with_file_line_caret_and_hint() -> None:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(AB + "* -> volume_anchor\n", filename="model.pc")
    text = str(info.value)
    assert text.splitlines() == [
        "model.pc:2:6: error[E201]: unknown group `volume_anchor`",
        "    * -> volume_anchor",
        "         ^~~~~~~~~~~~~",
        "  hint: did you mean `volume_anchors`?",
    ]


def test_pattern_error_is_a_value_error() -> None:
    assert issubclass(patternc.PatternError, ValueError)


# ------------------------------------------------ hand-written pattern lists

SPECS = [TokenSpec("surface_anchors", 4), TokenSpec("surface_queries", 3), TokenSpec("volume_anchors", 5)]


def test_check_patterns_accepts_valid_list() -> None:
    check_patterns(
        SPECS,
        [
            AttentionPattern(["surface_anchors", "surface_queries"], ["surface_anchors"]),
            AttentionPattern(["volume_anchors"], ["volume_anchors", "surface_anchors"]),
        ],
    )


def test_check_patterns_reports_everything_with_places() -> None:
    with pytest.raises(patternc.PatternError) as info:
        check_patterns(
            SPECS,
            [
                AttentionPattern(["surface_anchors", "surface_queries"], ["surface_anchor"]),
                AttentionPattern(["surface_queries"], ["volume_anchors"]),
            ],
        )
    diags = info.value.diagnostics
    assert codes(list(diags)) == ["E201", "E302", "E301"]
    assert diags[0].where == "attention_patterns[0].key_value_tokens[0]"
    assert diags[0].hint == "did you mean `surface_anchors`?"
    assert "attention_patterns[0] and attention_patterns[1]" in diags[1].message
    assert diags[2].message == "group `volume_anchors` is a query in no rule of pattern `attention_patterns`"
    assert str(info.value).startswith("attention_patterns[0].key_value_tokens[0]: error[E201]")


def test_check_patterns_skips_cached_groups() -> None:
    specs = [TokenSpec("anchors", None), TokenSpec("queries", 7)]
    check_patterns(specs, [AttentionPattern(["anchors", "queries"], ["anchors"])])
    check_patterns(specs, [AttentionPattern(["queries"], ["anchors"])])


def test_check_patterns_empty_and_duplicates() -> None:
    with pytest.raises(patternc.PatternError) as info:
        check_patterns([TokenSpec("a", 1), TokenSpec("a", 2)], [])
    assert codes(list(info.value.diagnostics)) == ["E101", "E303", "E301"]
    with pytest.raises(patternc.PatternError) as info:
        check_patterns([TokenSpec("a", 1)], [AttentionPattern(["a", "a"], [])])
    assert codes(list(info.value.diagnostics)) == ["E305", "E304"]
    assert "listed twice" in info.value.diagnostics[0].message


# ------------------------------------------------------------ hints that keep the meaning


VLM = "groups image text\nimage -> image\ntext -> image\ntext -> text [causal]\n"


def keys_of(source: str) -> dict[str, list[tuple[str, bool]]]:
    plan = patternc.compile(source).patterns["default"]
    return {q: [(k.name, k.modifiers.causal) for k in rule.keys] for rule in plan.rules for q in rule.queries}


def test_overlap_merge_keeps_each_keys_modifiers() -> None:
    (diag,) = errors_of(VLM)
    assert diag.code == "E302" and diag.line == 4
    assert diag.hint is not None and "(`text -> image, text[causal]`)" in diag.hint
    assert diag.fix is not None and diag.fix.title == "merge into `text -> image, text[causal]`"
    merged = diag.fix.apply(VLM)
    assert merged == "groups image text\nimage -> image\ntext -> image, text[causal]\n"
    assert keys_of(merged)["text"] == [("image", False), ("text", True)]


def test_overlap_merge_fix_keeps_other_statements_on_the_line() -> None:
    source = "groups a b\nb -> b\na -> b[window 2]\na -> a [causal]; b -> a\n"
    diags = errors_of(source)
    assert codes(diags) == ["E302", "E302"]
    merged = diags[0].fix.apply(source) if diags[0].fix else ""
    assert merged == "groups a b\nb -> b\na -> b[window 2], a[causal]\n; b -> a\n"


def test_overlap_with_different_modifiers_for_one_key_offers_no_merge() -> None:
    (diag,) = errors_of("groups a b\nb -> b\na -> a, b\na -> a [causal]\n")
    assert diag.code == "E302" and diag.fix is None
    assert diag.hint is not None
    assert "the two rules give key `a` different modifiers (none and [causal])" in diag.hint
    assert "`a -> a, b`" not in diag.hint


def test_misspelt_glob_gets_did_you_mean_and_no_cascade() -> None:
    source = "groups surface_a surface_b vol\nsurfce_* -> surface_a\nvol -> vol\n"
    (diag,) = diagnostics_of(source)  # no E301 for surface_a, surface_b
    assert diag.code == "E202" and diag.message == "glob `surfce_*` matches no group"
    assert diag.hint == "did you mean `surface_*`?"
    assert diag.fix is not None
    assert patternc.compile(diag.fix.apply(source)).groups == ("surface_a", "surface_b", "vol")


def test_misspelt_glob_end_is_respelt_too() -> None:
    (diag,) = errors_of("groups a_surface b_surface vol\n*_surfce, vol -> vol\n")
    assert diag.hint == "did you mean `*_surface`?"


def test_misspelt_declaration_is_one_error_at_its_place() -> None:
    source = (
        "groups surface_anchors surfce_queries\n"
        "surface_anchors -> surface_anchors\n"
        "surface_queries -> surface_anchors, surface_queries\n"
    )
    (diag,) = diagnostics_of(source)  # not a "did you mean `surfce_queries`?" at each use
    assert diag.code == "E201" and (diag.line, diag.column) == (1, 24)
    assert (
        diag.message == "group `surfce_queries` is declared, but the rules name `surface_queries` (2 times)"
    )
    assert diag.hint == "did you mean `surface_queries`? the declaration looks misspelt"
    assert diag.fix is not None
    program = patternc.compile(diag.fix.apply(source))
    assert program.groups == ("surface_anchors", "surface_queries")


def test_a_name_misspelt_once_is_reported_where_it_is_used() -> None:
    (diag,) = errors_of("groups anchors queries\nanchors -> anchors\nquries -> anchors\n")
    assert diag.code == "E201" and diag.line == 3 and diag.hint == "did you mean `queries`?"
    assert diag.fix is not None and diag.fix.edits[0].replacement == "queries"


def test_unknown_pattern_lists_the_patterns() -> None:
    program = patternc.compile(AB + "pattern self_anchor { * -> *_anchors }\npattern joint { * -> * }\n")
    with pytest.raises(KeyError) as info:
        program.patterns["self_anchr"]
    message = str(info.value)
    assert message == "no pattern `self_anchr`; did you mean `self_anchor`? patterns: `self_anchor`, `joint`"
    with pytest.raises(KeyError, match="no pattern `nope`; patterns: `self_anchor`, `joint`"):
        program.patterns["nope"]
    assert program.patterns.get("nope") is None and "joint" in program.patterns
