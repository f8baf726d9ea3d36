"""Edge cases of families with parts, member relations, grids, ``self`` and
``nothing``: how they combine with rule-level modifiers, exclusions, each
other's names and the warnings, what run-time names bind to, and the
messages (with their hints) when a file or an input does not fit."""

from __future__ import annotations

import pytest
import torch
from reference import masked_attention, relative_error
from test_flex import make
from test_structured import plan_of

import patternc
from patternc import PatternError


def error_of(source: str, code: str) -> patternc.Diagnostic:
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    return next(d for d in error.value.diagnostics if d.code == code)


def bound_keys(plan: patternc.Plan, names: list[str]) -> dict[str, list[str]]:
    """Each bound query group and the key groups it reads."""
    return {q: [k.text() for k in r.keys] for r in plan.bind(names).rules for q in r.queries}


# ---------------------------------------------------------------- reading nothing, by families


@pytest.mark.parametrize("members", [0, 1, 3])
def test_a_family_may_read_nothing(members: int) -> None:
    plan = plan_of("groups x doc*\nx -> x, doc*\ndoc* -> nothing")
    sizes = {"x": 3, **{f"doc{i}": 2 + i for i in range(members)}}
    mask = plan.layout(sizes).dense_mask()
    assert not mask[3:].any() and mask[:3].all()
    module = make(plan, "batched")
    x = torch.randn(1, sum(sizes.values()), 16)
    out, _ = module(x, sizes)
    assert relative_error(out, masked_attention(module, x.double(), mask)) < 1e-5


# ---------------------------------------------------------------- warnings that relations make wrong


@pytest.mark.parametrize(
    "source",
    [
        "groups frame*\nframe* -> frame*[upto]",
        "groups frame*\nframe* -> frame* [upto]",
        "groups doc*\ndoc* -> self",
        "groups a* b*\na*, b* -> (a*, b*)[same]",
        "groups t*_*\nt*_* -> t*_*[kernel 3]",
    ],
)
def test_member_relations_are_not_full_attention(source: str) -> None:
    assert not [w for w in patternc.compile(source).warnings if w.code == "W103"]


def test_plain_family_to_itself_is_still_full_attention() -> None:
    (warning,) = patternc.compile("groups frame*\nframe* -> frame*").warnings
    assert warning.code == "W103"


def test_a_rule_relation_alone_restarts_no_positions() -> None:
    program = patternc.compile("groups a* b*\na* -> a*, b* [upto]\nb* -> self")
    assert not [w for w in program.warnings if w.code == "W102"]


def test_the_per_key_fix_keeps_the_relation() -> None:
    source = "groups a* b*\na* -> a*, b* [upto, causal]\nb* -> self"
    (warning,) = [w for w in patternc.compile(source).warnings if w.code == "W102"]
    assert warning.message.startswith("[upto, causal] applies to each of 2 key groups")
    assert warning.fix is not None
    (edit,) = warning.fix.edits
    assert edit.replacement == "[upto, causal]"


# ---------------------------------------------------------------- `self` and rule-level lists


def test_self_with_its_own_list_and_the_rules_is_two_lists() -> None:
    diag = error_of("groups frame*\nframe* -> self[causal] [window 2]", "E023")
    assert "`self` has modifiers [causal] here and [window 2] for the whole rule" in diag.message
    assert diag.hint is not None and "in one place" in diag.hint
    assert (diag.line, diag.column) == (2, 15)


def test_self_with_the_same_list_as_the_rule_is_accepted() -> None:
    plan = plan_of("groups frame*\nframe* -> self [causal]")
    assert bound_keys(plan, ["frame0", "frame1"]) == {
        "frame0": ["frame0[causal]"],
        "frame1": ["frame1[causal]"],
    }


def test_a_rule_relation_on_self_alone_is_refused() -> None:
    diag = error_of("groups frame*\nframe* -> self [upto]", "E025")
    assert "`upto` on `self`" in diag.message
    assert diag.hint is not None and "frame*[upto]" in diag.hint


# ---------------------------------------------------------------- messages of lists that hold a relation


def test_relation_in_an_exclusion_is_named() -> None:
    diag = error_of("groups a* b*\na*, b* -> * - b*[upto]", "E024")
    assert diag.message == "modifiers [upto] mean nothing in an exclusion"


def test_relation_and_rule_modifiers_on_one_key_are_named() -> None:
    diag = error_of("groups frame* a\na -> a\nframe* -> a, frame*[before] [causal]", "E023")
    assert "`frame*` has modifiers [before] here and [causal] for the whole rule" in diag.message


@pytest.mark.parametrize(
    ("modifiers", "message", "hint"),
    [
        (
            "[kernel 0]",
            "`kernel` takes a whole number of members (at least 1)",
            "`[kernel 3]`: a 3-wide window",
        ),
        ("[near -1]", "`near` takes a whole number of members (at least 0)", "`[near 1]`: members within 1"),
        ("[near 1, kernel 3]", "two member relations (`near 1` and `kernel 3`)", "`near`, `kernel`"),
    ],
)
def test_grid_relation_errors(modifiers: str, message: str, hint: str) -> None:
    source = f"groups t*_*\nt*_* -> t*_*{modifiers}"
    code = "E022" if "," in modifiers else "E021"
    diag = error_of(source, code)
    assert message in diag.message
    assert diag.hint is not None and hint in diag.hint


# ---------------------------------------------------------------- declarations that overlap


def test_a_family_declared_plain_and_with_parts_is_refused() -> None:
    diag = error_of("groups doc* doc*{a, b}\ndoc* -> self", "E206")
    assert "`doc*` is declared both without parts (line 1) and with parts" in diag.message
    assert diag.hint is not None and "`groups doc*{a, b}`" in diag.hint
    assert (diag.line, diag.column) == (1, 18)


def test_a_grid_with_parts_is_refused_with_a_hint_that_differs() -> None:
    diag = error_of("groups t*_*{a, b}\nt*_*.a -> self", "E206")
    assert "a grid family has no parts" in diag.message
    assert diag.hint is not None and "t*_*{" not in diag.hint


def test_a_named_part_wins_over_a_family_of_parts() -> None:
    # in a rule `doc*.a*` is a glob that selects `doc*.a` too
    plan = plan_of("groups doc*{a*, a}\n(doc*.a* - doc*.a) -> self [causal]\ndoc*.a -> self")
    bound = plan.bind(["doc0.a", "doc0.a1"])
    assert bound.types == {"doc0.a": "a", "doc0.a1": "a"}
    assert bound_keys(plan, ["doc0.a", "doc0.a1"]) == {"doc0.a": ["doc0.a"], "doc0.a1": ["doc0.a1[causal]"]}


# ---------------------------------------------------------------- run-time names


def test_two_grid_members_at_one_place_are_refused() -> None:
    plan = plan_of("groups t*_*\nt*_* -> t*_*[near 1]")
    with pytest.raises(PatternError) as error:
        plan.layout({"t0_0": 1, "t00_0": 1})
    (diag,) = error.value.diagnostics
    assert diag.code == "E408" and "`t00_0` and `t0_0` are both at (0, 0) of `t*_*`" in diag.message
    assert diag.hint is not None and "one member per place" in diag.hint


PARTS = plan_of(
    "groups sys doc*{prefix, text}\nsys -> sys\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self"
)
GRID = plan_of("groups cap tile*_*\ncap -> *\ntile*_* -> tile*_*[kernel 3], cap")


@pytest.mark.parametrize(
    ("plan", "name", "hint"),
    [
        (PARTS, "doc0", "members of `doc*` are named by their parts: `doc0.prefix`, `doc0.text`"),
        (PARTS, "doc0.txt", "did you mean `doc0.text`? (`doc*` has the parts prefix, text)"),
        (PARTS, "doc0.title", "`doc*` has the parts prefix, text"),
        (GRID, "tile_a_b", "`tile*_*` takes whole-number coordinates: `tile0_1`"),
        (GRID, "tile-1_0", "`tile*_*` takes whole-number coordinates: `tile0_1`"),
    ],
)
def test_names_that_are_almost_members_get_the_form_as_a_hint(
    plan: patternc.Plan, name: str, hint: str
) -> None:
    sizes = {"sys": 1, "cap": 1, name: 2}
    sizes = {g: n for g, n in sizes.items() if g in plan.groups or g == name}
    with pytest.raises(PatternError) as error:
        plan.layout(sizes)
    (diag,) = error.value.diagnostics
    assert diag.code == "E405" and f"`{name}`" in diag.message
    assert diag.hint is not None and hint in diag.hint


# ---------------------------------------------------------------- editor


def test_editor_words_include_parts_and_grids() -> None:
    from patternc import editor

    text = "groups sys run*{text, image} tile*_*\nsys -> *\nrun*.text -> run*[before], self\nrun*.image -> self\n" \
        "tile*_* -> tile*_*[kernel 3]\n"  # fmt: skip
    assert editor.word_at(text, 3, 7) == "run*.text"
    assert editor.word_at(text, 5, 3) == "tile*_*"
    assert list(editor.declared_groups(text)) == ["sys", "run*.text", "run*.image", "tile*_*"]
    hover = editor.hover(text, 3, 7)
    assert hover is not None and "query in `run*.text -> run*[before], self`" in hover
    hover = editor.hover(text, 5, 3)
    assert hover is not None and "query in `tile*_* -> tile*_*[kernel 3]`" in hover
    assert editor.declaration(text, 3, 7) == editor.Location(1, 17, 21)


def test_editor_reads_parts_listed_over_several_lines() -> None:
    from patternc import editor

    text = "groups sys qa*{\n    question,\n    answer*\n}\nsys -> sys\nqa*.question -> self\n" \
        "qa*.answer* -> qa*.question[same], self[causal]\n"  # fmt: skip
    declared = editor.declared_groups(text)
    assert list(declared) == ["sys", "qa*.question", "qa*.answer*"]
    assert declared["qa*.answer*"] == editor.Location(3, 5, 12)
    labels = {c.label for c in editor.completions(text, 5, 1)}
    assert {"qa*.question", "qa*.answer*"} <= labels


# ---------------------------------------------------------------- command line


DOC_FILE = "examples/cookbook/prefix_per_document.patc"


@pytest.mark.parametrize(
    ("sizes", "said"),
    [
        ("doc0.prefix=3,doc0.txt=4", "unknown group `doc0.txt`; did you mean `doc0.text`?"),
        ("doc0=3", "unknown group `doc0`; members of `doc*` are named by their parts: `doc0.prefix`"),
    ],
)
def test_cli_sizes_that_are_almost_members(sizes: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    from patternc.cli import main

    assert main(["compile", DOC_FILE, "--sizes", sizes]) == 2
    assert said in capsys.readouterr().err


def test_cli_compiles_parts_in_the_order_given(capsys: pytest.CaptureFixture[str]) -> None:
    from patternc.cli import main

    sizes = "doc1.text=2,doc0.prefix=3,doc0.text=4,doc1.prefix=1"
    assert main(["compile", DOC_FILE, "--sizes", sizes, "--mask", "-", "--block", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("doc")]
    assert [r.split()[0] for r in rows] == ["doc1.text", "doc0.prefix", "doc0.text", "doc1.prefix"]


def test_editor_hover_on_a_family_with_parts_lists_them() -> None:
    from patternc import editor

    text = "groups sys run*{text, image}\nsys -> *\nrun*.text -> run*[before], self\nrun*.image -> self\n"
    hover = editor.hover(text, 3, 16)  # `run*` of `run*[before]`
    assert hover is not None and hover.startswith("**run\\***: a family with the parts `text`, `image`")
    assert "query in `run*.text -> run*[before], self`" in hover and "query in `run*.image -> self`" in hover


def test_editor_an_unclosed_parts_list_ends_at_the_next_statement() -> None:
    from patternc import editor

    text = "groups sys doc*{a, b\nsys -> sys\ngroups c\n"
    assert list(editor.declared_groups(text)) == ["sys", "doc*.a", "doc*.b", "c"]


# ---------------------------------------------------------------- fmt


def test_fmt_closes_parts_on_their_last_line_without_a_space() -> None:
    from patternc.fmt import format_source

    source = "groups sys doc*{\n  a ,\n  b}\nsys -> sys\ndoc* -> self\n"
    formatted = format_source(source)
    assert formatted.splitlines()[:3] == ["groups sys doc*{", "    a,", "    b}"]
    assert format_source(formatted) == formatted


def test_reading_nothing_is_named_in_the_report_and_the_exports() -> None:
    from patternc.export import NotExpressible
    from patternc.export.xformers import xformers_mask
    from patternc.report import format_program

    program = patternc.compile("groups x doc*\nx -> x, doc*\ndoc* -> nothing")
    layout = program.patterns["default"].layout({"x": 2, "doc0": 3, "doc1": 1})
    assert layout.calls[1].attention.text() == "doc0, doc1 -> nothing"
    with pytest.raises(NotExpressible, match=r"`doc0, doc1 -> nothing` reads no key"):
        xformers_mask(layout)
    report = format_program(program, sizes={"x": 2, "doc0": 3, "doc1": 1})
    assert any(
        line.split()[1:4] == ["doc0,", "doc1", "nothing"] for line in report.splitlines() if line.strip()
    )


def test_a_member_without_the_part_it_reads_is_told_so() -> None:
    plan = plan_of("groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same]")
    with pytest.raises(PatternError) as error:
        plan.layout({"doc0.prefix": 1, "doc0.text": 2, "doc1.text": 2})
    (diag,) = error.value.diagnostics
    assert diag.code == "E407"
    assert "`doc1.text` reads no keys under rule `doc*.text -> doc*.prefix[same]` (line 3): " \
        "`doc*.prefix[same]` selects no member for it" in diag.message  # fmt: skip
    assert diag.hint is not None and "(`doc*.text -> doc*.prefix[same], self`)" in diag.hint


def test_a_plain_family_and_a_grid_of_one_prefix_bind_apart() -> None:
    plan = plan_of("groups tile* tile*_*\ntile* - tile*_* -> self\ntile*_* -> tile*_*[near 1]")
    names = ["tile0", "tile0_0", "tile1_0", "tile_x", "tile3_0"]
    assert bound_keys(plan, names) == {
        "tile0": ["tile0"],
        "tile_x": ["tile_x"],
        "tile0_0": ["tile0_0", "tile1_0"],
        "tile1_0": ["tile0_0", "tile1_0"],
        "tile3_0": ["tile3_0"],
    }
    assert plan.bind(names).groups == ("tile0", "tile_x", "tile0_0", "tile1_0", "tile3_0")


def test_a_glob_with_no_group_declared_says_so() -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile("groups t*_*{a, b}\nt*_*.a -> self")
    glob = next(d for d in error.value.diagnostics if d.code == "E202")
    assert glob.hint == "no group is declared: add a `groups ...` line"
