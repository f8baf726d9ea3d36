"""flex's non-finite guard: where it runs (``values_cross_groups``, decided
on the host per layout) and what its poisoning computes (``_poison``),
each against a dense token-by-token answer."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from reference import language_mask, relative_error

import patternc
from patternc.nn import flexmask
from patternc.nn.executors import flex
from patternc.nn.flexmask import FlexTables, group_segments, values_cross_groups
from patternc.nn.schedule import schedule_for

PLANS = {
    "prefix": "groups prefix text\nprefix -> prefix\ntext -> prefix, text[causal]",
    "vlm": "groups registers image text\nregisters, image -> registers, image\n"
    "text -> registers, image, text[causal]",
    "all pairs": "groups a b\na, b -> a, b",
    "docs": "groups doc*\ndoc* -> self",
    "docs causal": "groups doc*\ndoc* -> self [causal]",
    "ab-upt": "groups sa sq va vq\nsa, sq -> sa\nva, vq -> va",
    "one way": "groups a b  # noqa: W101\na -> a\nb -> a",
}


def _layout(plan: str, sizes: dict[str, int]) -> object:
    compiled = patternc.compile(PLANS[plan]).patterns["default"]
    return schedule_for(compiled.token_specs(sizes), compiled)


def _crosses_on_device(tables: FlexTables, n: int) -> bool:
    """Whether a block the kernel computes (partial or full) holds a real
    query and a real key whose groups are not an allowed pair, token by token."""
    q_group, kv_group = tables.q_group[:n], tables.kv_group[:n]
    unread = ~tables.allowed[q_group[:, None], kv_group[None, :]]
    computed = (tables.partial | tables.full).repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :n]
    return bool((computed & unread).any())


def _host_answer(layout: object) -> bool:
    queries, keys = group_segments(layout, {})  # type: ignore[arg-type]
    return values_cross_groups(queries, keys, layout.pairs.keys(), 128)  # type: ignore[attr-defined]


def _random_sizes(plan: str, rng: random.Random) -> dict[str, int]:
    names = {
        "prefix": ["prefix", "text"],
        "vlm": ["registers", "image", "text"],
        "all pairs": ["a", "b"],
        "ab-upt": ["sa", "sq", "va", "vq"],
        "one way": ["a", "b"],
    }.get(plan) or [f"doc{i}" for i in range(rng.randint(1, 5))]
    # whole blocks, odd sizes and empty groups
    return {name: rng.choice([0, 1, 37, 128, 129, 200, 256, 300]) for name in names}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_the_host_answer_agrees_with_the_blocks_token_by_token(plan: str) -> None:
    """Without modifiers the host's answer is the device's exactly; with them
    it may say True where no value crosses (a modifier can empty a block
    the host counts as computed), never the reverse."""
    rng = random.Random(plan)
    modified = "[" in PLANS[plan]
    for _ in range(12):
        sizes = _random_sizes(plan, rng)
        if not sum(sizes.values()):
            continue
        layout = _layout(plan, sizes)
        tables = FlexTables.build(layout, {}, "cpu")  # type: ignore[arg-type]
        truth = _crosses_on_device(tables, layout.n_tokens)  # type: ignore[attr-defined]
        host = _host_answer(layout)
        assert host >= truth, sizes
        if not modified:
            assert host == truth, sizes
        assert tables.needs_value_guard >= host, sizes  # narrower than the block test, never wider


@pytest.mark.parametrize(
    ("plan", "sizes", "mix", "crosses"),
    [
        # a modifier's diagonal hides keys of a group its queries read: no guard
        ("prefix", {"prefix": 1024, "text": 3072}, True, False),
        # image queries and text keys share the block at 1040: image does not read text
        ("vlm", {"registers": 16, "image": 1024, "text": 3072}, True, True),
        # blocks mix groups that read each other both ways
        ("all pairs", {"a": 100, "b": 100}, True, False),
        ("docs", {"doc0": 100, "doc1": 100}, True, True),
        # b reads a; the block they share has an a query, which reads nothing of b
        ("one way", {"a": 100, "b": 100}, True, True),
        ("ab-upt", {"sa": 128, "sq": 256, "va": 128, "vq": 90}, False, False),
    ],
)
def test_the_guard_runs_where_a_value_can_cross_groups(
    plan: str, sizes: dict[str, int], mix: bool, crosses: bool
) -> None:
    layout = _layout(plan, sizes)
    tables = flex.flex_tables(layout, {}, torch.device("cpu"))  # type: ignore[arg-type]
    assert tables.needs_value_guard is mix
    assert _host_answer(layout) is crosses
    key = flex._tables_key({}, torch.device("cpu"), 128, False, False)[1:]
    assert flex._values_cross_groups(layout, tables, key) is crosses


def test_too_many_block_classes_to_test_run_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_GUARD_CLASSES pairs of block classes the host does not test
    them and answers True (the guard runs: correct, only slower)."""
    layout = _layout("all pairs", {"a": 100, "b": 100})
    assert not _host_answer(layout)
    monkeypatch.setattr(flexmask, "MAX_GUARD_CLASSES", 0)
    assert _host_answer(layout)


@pytest.mark.parametrize("plan", ["vlm", "docs", "one way", "ab-upt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_poison_marks_the_queries_whose_groups_read_a_bad_key(plan: str, seed: int) -> None:
    """``_poison`` against the dense answer: query ``q`` of head ``h`` is NaN
    exactly where some key ``k`` with a bad flag in that head has a group
    that ``q``'s group reads; everything else is left as it was."""
    rng = random.Random(seed)
    sizes = _random_sizes(plan, rng)
    sizes[next(iter(sizes))] += 3  # never empty
    layout = _layout(plan, sizes)
    tables = FlexTables.build(layout, {}, "cpu")  # type: ignore[arg-type]
    n, n_kv = layout.n_tokens, tables.kv_len  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    batch, heads = 2, 3
    bad = torch.rand(batch, n_kv, heads, generator=gen) < 0.004
    bad[:, n:] = False  # padded keys are zeros
    out = torch.randn(batch, n, heads, 5, generator=gen)
    got = flex._poison(out, bad, *tables.guard_tables)
    reads = tables.allowed[tables.q_group[:n, None], tables.kv_group[None, :]]  # [n, Nk]
    expected = (reads[None, :, :, None] & bad[:, None, :, :]).any(2)  # [B, n, H]
    assert torch.equal(torch.isnan(got).all(-1), expected)
    assert torch.equal(torch.isnan(got).any(-1), expected)
    assert torch.equal(got[~expected], out[~expected])


@pytest.mark.parametrize(
    ("plan", "sizes"),
    [
        ("vlm", {"registers": 5, "image": 70, "text": 131}),
        ("docs causal", {"doc0": 37, "doc1": 129, "doc2": 1}),
        ("one way", {"a": 100, "b": 57}),
        ("prefix", {"prefix": 61, "text": 90}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_the_key_guard_poisons_exactly_the_queries_that_read_a_bad_token(
    plan: str, sizes: dict[str, int], seed: int, device: str
) -> None:
    """The CUDA Triton path's guard (``"keys"``: a bad token's key made NaN,
    its value zeroed), on FlexAttention's eager kernel on CPU and its
    compiled Triton kernel on a GPU: a query's output is NaN exactly where
    its mask reads a token whose key or value holds a NaN or inf in that
    head, and every other output matches a float64 softmax over the
    language's mask (bad tokens are outside those rows)."""
    compiled = patternc.compile(PLANS[plan]).patterns["default"]
    layout = schedule_for(compiled.token_specs(sizes), compiled)
    tables = flex.flex_tables(layout, {}, torch.device(device))
    key = flex._tables_key({}, torch.device(device), 128, False, False)[1:]
    block_mask = flex._block_mask(layout, tables, None, key, torch.device(device))
    n, batch, heads, dim = layout.n_tokens, 2, 3, 16
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, dim, generator=gen) for _ in range(3))
    bad = torch.zeros(batch, n, heads, dtype=torch.bool)
    for where, value in (("k", float("nan")), ("v", float("inf")), ("kv", float("nan")), ("v", -float("inf"))):
        b, j, h = (int(torch.randint(0, m, (), generator=gen)) for m in (batch, n, heads))
        bad[b, j, h] = True
        for t in {"k": [k], "v": [v], "kv": [k, v]}[where]:
            t[b, j, h, int(torch.randint(0, dim, (), generator=gen))] = value
    padded = [flex._pad_tokens(t, tables.q_len).to(device) for t in (q, k, v)]
    # on CPU the plain function (traced=True), run eagerly; on a GPU the compiled graph
    attend = flex._attend_fn("keys", device == "cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention run eagerly says so
        out = attend(*padded, block_mask, None, None, None).transpose(1, 2)[:, :n].cpu()
    mask = language_mask(compiled, sizes)  # [n, n]
    expected = (mask[None, :, :, None] & bad[:, None, :, :]).any(2)  # [B, n, H]
    assert expected.any()
    assert torch.equal(torch.isnan(out).all(-1), expected)
    assert torch.equal(torch.isnan(out).any(-1), expected)
    clean_k, clean_v = (t.double().masked_fill(bad[..., None], 0.0) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), clean_k) / dim**0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    ref = torch.einsum("bhqk,bkhd->bqhd", weights, clean_v)
    assert relative_error(out[~expected], ref[~expected]) < 1e-5


@pytest.mark.parametrize(
    ("plan", "sizes", "device", "padded", "flash", "guard"),
    [
        ("vlm", {"registers": 16, "image": 1024, "text": 3072}, "cuda", False, False, "keys"),
        ("prefix", {"prefix": 1024, "text": 3072}, "cuda", False, False, "none"),
        ("vlm", {"registers": 16, "image": 1024, "text": 3072}, "cpu", False, False, "poison"),
        ("prefix", {"prefix": 1024, "text": 3072}, "cpu", False, False, "poison"),
        ("prefix", {"prefix": 1024, "text": 3072}, "cuda", True, False, "poison"),
        ("prefix", {"prefix": 1024, "text": 3072}, "cuda", False, True, "poison"),
    ],
)
def test_each_call_takes_its_guard(
    plan: str, sizes: dict[str, int], device: str, padded: bool, flash: bool, guard: str
) -> None:
    """The key guard where blocks carry a value across groups on the CUDA
    Triton kernel, none where they cannot, the poisoning guard on the CPU
    kernel, with key padding and on FLASH (decided on the host: the tables
    are built on the CPU here)."""
    layout = _layout(plan, sizes)
    tables = flex.flex_tables(layout, {}, torch.device("cpu"))  # type: ignore[arg-type]
    key = flex._tables_key({}, torch.device("cpu"), 128, False, False)[1:]
    got = flex._guard(layout, tables, key, padded, torch.device(device), flash)  # type: ignore[arg-type]
    assert got == guard
