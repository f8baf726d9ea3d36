"""FlexAttention's interval ``mask_mod``: each query's keys as at most two
runs of key indices, equal to the group-pair test wherever it is used."""

from __future__ import annotations

import pytest
import torch

import patternc
from patternc.lower.intervals import NO_BOUND, query_runs
from patternc.modifiers import Modifiers
from patternc.nn import PatternAttention
from patternc.nn.flexmask import FlexTables
from tests.programs import random_program
from tests.reference import language_mask

ZERO = torch.zeros((), dtype=torch.int64)


def _tables(source: str, sizes: dict[str, int], block: int = 128, pattern: str = "default") -> FlexTables:
    plan = patternc.compile(source).patterns[pattern]
    return FlexTables.build(plan.layout(sizes), {}, torch.device("cpu"), block, False, False)


def _masks(tables: FlexTables) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval mask and the group tables' mask over every (query, key)."""
    q = torch.arange(tables.q_len)[:, None]
    k = torch.arange(tables.kv_len)[None, :]
    reference = tables.mask_mod(None, lookups=True)(ZERO, ZERO, q, k)
    got = tables.mask_mod()(ZERO, ZERO, q.int(), k.int())
    return got, reference


USERS = {
    "documents": (
        "groups doc*\ndoc* -> self [causal]",
        {f"doc{i}": n for i, n in enumerate([5, 300, 17, 1000])},
    ),
    "vlm": (
        "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]",
        {"registers": 16, "image": 1031, "text": 777},
    ),
    "frames": (
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
        {"prompt": 33, **{f"frame{i}": 129 for i in range(5)}},
    ),
    "interleaved": (
        "groups system run*{text, image}\nsystem -> system [causal]\n"
        "run*.text -> system, run*[before], self[causal]\nrun*.image -> system, run*[before], self",
        {"system": 7, "run0.text": 50, "run1.image": 130, "run2.image": 64, "run3.text": 91},
    ),
    "prefixed documents": (
        "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]",
        {"doc0.prefix": 9, "doc0.text": 140, "doc1.text": 33, "doc2.prefix": 128, "doc2.text": 5},
    ),
    "window": ("groups tokens\ntokens -> tokens[causal, window 100]", {"tokens": 1001}),
    "asymmetric window": ("groups tokens\ntokens -> tokens[back 7, ahead 3]", {"tokens": 300}),
    "anchors": (
        "groups sa sq va vq\n* -> sa, va",
        {"sa": 64, "sq": 200, "va": 64, "vq": 130},
    ),
}


@pytest.mark.parametrize("name", list(USERS))
@pytest.mark.parametrize("block", [16, 128])
def test_users_layouts_use_intervals_equal_to_the_group_test(name: str, block: int) -> None:
    source, sizes = USERS[name]
    tables = _tables(source, sizes, block)
    assert tables.intervals is not None, name
    assert tables.intervals.dtype == torch.int32
    assert tables.intervals.shape[0] == (2 if name == "anchors" else 1)
    got, reference = _masks(tables)
    n = tables.n_queries
    assert torch.equal(got[:n, :n], reference[:n, :n])
    assert not got[n:].any() and not got[:, n:].any()  # padding reads and is read by nothing


def test_random_programs_interval_masks_equal_the_group_test() -> None:
    used = refused = 0
    for seed in range(150):
        source, sizes = random_program(seed)
        program = patternc.compile(source)
        for name in program.patterns:
            tables = _tables(source, sizes, 4, name)
            if tables.intervals is None:
                refused += 1
                continue
            used += 1
            got, reference = _masks(tables)
            n = tables.n_queries
            assert torch.equal(got[:n, :n], reference[:n, :n]), (seed, name, source, sizes)
            language = language_mask(program.patterns[name], sizes)
            assert torch.equal(got[:n, :n], language), (seed, name, source, sizes)
            assert not got[n:].any() and not got[:, n:].any()
    assert used > 50 and refused > 50, (used, refused)  # both paths are exercised


@pytest.mark.parametrize(
    ("source", "sizes", "why"),
    [
        ("groups t\nt -> t[dilate 2]", {"t": 40}, "dilated"),
        ("groups a g b\na, g, b -> a, g, b[causal, window 4, across]", {"a": 10, "g": 1, "b": 10}, "across"),
        ("groups a b c d e\n* -> a, c, e", {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3}, "three runs"),
        ("groups a b c\n* -> a, b[window 2], c", {"a": 3, "b": 9, "c": 3}, "a window inside a run"),
    ],
)
def test_layouts_that_are_not_intervals_keep_the_group_test(
    source: str, sizes: dict[str, int], why: str
) -> None:
    tables = _tables(source, sizes, 16)
    assert tables.intervals is None, why
    got, reference = _masks(tables)  # the group-pair test, still exact
    n = tables.n_queries
    assert torch.equal(got[:n, :n], reference[:n, :n])


def test_query_runs_bounds() -> None:
    """A causal pair after a whole one: one run from the first key to the query."""
    pairs = {(1, 0): Modifiers(), (1, 1): Modifiers(causal=True)}
    runs = query_runs([(0, 0, 4), (1, 4, 10)], [(0, 0, 4), (1, 4, 10)], pairs)
    assert runs is not None
    assert runs[0] == []  # group 0 reads nothing
    (run,) = runs[1]
    assert (run.first, run.low, run.cap) == (0, -NO_BOUND, 4)
    assert (run.last, run.last_top, run.high, run.floor) == (4, 5, 0, 3)


def test_a_group_whose_keys_lie_in_two_places_has_no_runs() -> None:
    assert query_runs([(0, 0, 3)], [(0, 0, 3), (0, 5, 8)], {(0, 0): Modifiers()}) is None


def test_flex_on_interval_layouts_matches_the_float64_reference() -> None:
    """The executor end to end (CPU FlexAttention) on a layout whose blocks
    mix groups, at odd sizes."""
    from tests.reference import reference_pattern_attention, relative_error

    for sizes in ({"registers": 3, "image": 37, "text": 29}, {"registers": 1, "image": 130, "text": 3}):
        source = USERS["vlm"][0]
        plan = patternc.compile(source).patterns["default"]
        layer = PatternAttention(
            patternc.MixedAttentionConfig(hidden_dim=32, num_heads=2), plan, backend="flex"
        )
        assert layer_uses_intervals(plan, sizes)
        x = torch.randn(2, sum(sizes.values()), 32)  # CPU FlexAttention has no float64
        with torch.no_grad():
            out = layer(x, sizes)[0]
            ref = reference_pattern_attention(layer, x.double(), plan, sizes)
        assert relative_error(out, ref) < 1e-5


def layer_uses_intervals(plan: patternc.Plan, sizes: dict[str, int]) -> bool:
    return (
        FlexTables.build(plan.layout(sizes), {}, torch.device("cpu"), 128, False, False).intervals is not None
    )
