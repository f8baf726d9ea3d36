"""FlexAttention's per-layout tables stay linear in the groups, the allowed
group runs and the non-empty blocks (no ``[groups, groups]`` table), and
their run lookups are exact against the language's definition."""

from __future__ import annotations

import dataclasses
import time
import warnings

import pytest
import torch
from reference import language_mask, relative_error
from torch import Tensor

import patternc
from patternc.lower.blocks import block_classes, pair_runs
from patternc.nn.flexmask import FlexTables, GroupTables
from patternc.nn.tables import table_bytes

DOCS = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]


def _documents(n: int, seed: int = 0) -> dict[str, int]:
    lengths = torch.randint(1, 65, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {f"doc{i}": int(length) for i, length in enumerate(lengths)}


def _tensors(table: object) -> list[Tensor]:
    """Every tensor a table holds (in dataclasses and tuples, as tables are built)."""
    if isinstance(table, Tensor):
        return [table]
    if isinstance(table, (tuple, list)):
        return [t for item in table for t in _tensors(item)]
    if dataclasses.is_dataclass(table) and not isinstance(table, type):
        return [t for f in dataclasses.fields(table) for t in _tensors(getattr(table, f.name))]
    return []


def _build(n_docs: int) -> tuple[FlexTables, float, int]:
    """The tables of ``n_docs`` packed causal documents, the fastest of three
    builds (seconds, every cache of tables cleared) and the layout's tokens.
    Timed on one torch thread: the build is host work and small kernels, and
    on a shared CPU a second thread's spinning can cost more than the work."""
    layout = DOCS.layout(_documents(n_docs, seed=n_docs))
    seconds = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            layout.tables.clear()
            start = time.perf_counter()
            tables = FlexTables.build(layout, {}, "cpu")
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        layout.tables.clear()
    return tables, min(seconds), layout.n_tokens


def test_ten_thousand_documents_build_linear_tables_fast() -> None:
    """10,000 packed causal documents: the tables build in well under a
    second, hold no table that grows with the groups squared (nor the blocks
    squared), and five times the documents cost about five times the bytes
    (a ``[groups, groups]`` table would cost twenty-five)."""
    small, _, small_tokens = _build(2000)
    large, seconds, tokens = _build(10_000)
    assert seconds < 0.8, seconds
    rows, cols = large.block_shape
    for tables, n_docs in ((small, 2000), (large, 10_000)):
        blocks = tables.block_shape[0] + tables.block_shape[1]
        bound = 2 * (tables.q_len + tables.kv_len) + 16 * (n_docs + 1) + 16 * blocks
        sizes = [t.numel() for t in _tensors(tables)]
        assert max(sizes) <= bound, (max(sizes), bound)
    assert large.partial_blocks.dim() == 1  # held sparse: the grid is 8k x 8k blocks
    assert large.partial_blocks.numel() + large.full_blocks.numel() < 4 * (rows + cols)
    ratio = table_bytes(large) / table_bytes(small)
    assert ratio < 1.5 * tokens / small_tokens, (ratio, table_bytes(small), table_bytes(large))


def test_sparse_block_classes_equal_the_dense_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held sparse (a large grid) or dense, the block classes are the same,
    and equal the pure-Python classifier's."""
    from patternc.nn import flexblocks

    layout = DOCS.layout(_documents(60, seed=3))
    dense = FlexTables.build(layout, {}, "cpu")
    layout.tables.clear()
    monkeypatch.setattr(flexblocks, "DENSE_CELLS_PER_BLOCK", 0)
    sparse = FlexTables.build(layout, {}, "cpu")
    layout.tables.clear()
    assert dense.partial_blocks.dim() == 2 and sparse.partial_blocks.dim() == 1
    assert torch.equal(dense.partial, sparse.partial) and torch.equal(dense.full, sparse.full)
    assert dense.sparsity == pytest.approx(sparse.sparsity)
    python = torch.tensor(block_classes(layout).classes)
    n = python.shape[0]
    assert torch.equal(python == 2, dense.full[:n, :n]) and torch.equal(python == 1, dense.partial[:n, :n])


MANY_RUNS = {
    # a text reads every earlier member's prefix: one run per prefix (they are not adjacent)
    "prefixes before": (
        "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[before], self[causal]",
        {
            name: size
            for i, (p, t) in enumerate([(3, 40), (0, 7), (5, 1), (17, 30), (1, 2), (9, 60), (4, 11)])
            for name, size in ((f"doc{i}.prefix", p), (f"doc{i}.text", t))
            if size
        },
    ),
    # past 512 groups the mask_mod reads the run tables: one run per frame
    "600 frames": (
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
        {"prompt": 5, **{f"frame{i}": 1 + (i % 3 == 0) for i in range(600)}},
    ),
    "frame window across": (
        "groups frame*\nframe* -> frame*[upto 2, causal, across]",
        {f"frame{i}": n for i, n in enumerate([64, 200, 1, 129, 77, 3, 0, 30])},
    ),
}


@pytest.mark.parametrize("name", list(MANY_RUNS))
def test_run_lookups_equal_the_language_definition(name: str) -> None:
    """The ``mask_mod`` that reads the run tables (a binary search within a
    query group's runs) and the one that tests bit words, evaluated on every
    (query, key) pair, equal the mask written from the language's definition."""
    source, sizes = MANY_RUNS[name]
    plan = patternc.compile(source).patterns["default"]
    layout = plan.layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu")
    n = layout.n_tokens
    want = language_mask(plan, sizes)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    looked_up = tables.mask_mod(lookups=True)(zero, zero, q_idx, kv_idx)
    assert torch.equal(looked_up, want)
    if tables.pair_sets is not None:
        assert torch.equal(tables.mask_mod()(zero, zero, q_idx, kv_idx), want)
    runs = pair_runs(layout)
    assert runs.count <= len(layout.pairs)
    if name == "600 frames":  # one run per member, not one per pair
        assert (runs.count, len(layout.pairs)) == (601, 1 + 600 * 601 // 2 + 600)


def test_run_tables_search_within_a_query_groups_runs() -> None:
    """A query group with many runs takes a few search steps; the tables are
    as long as the runs (plus a pad), never the groups squared."""
    source, sizes = MANY_RUNS["prefixes before"]
    layout = patternc.compile(source).patterns["default"].layout(sizes)
    groups: GroupTables = FlexTables.build(layout, {}, "cpu").groups
    runs = pair_runs(layout)
    assert groups.max_runs >= 5
    assert groups.runs.shape == (3, runs.count)
    assert groups.run_keys.shape[1] == runs.count + groups.max_runs
    assert groups.row_start.shape == (len(layout.all_groups) + 2,)


def test_flex_with_run_lookups_matches_the_float64_reference() -> None:
    """FlexAttention (unfused, on CPU) with the block mask whose ``mask_mod``
    reads the run tables, against softmax over the language's mask in float64."""
    from torch.nn.attention.flex_attention import flex_attention

    source, sizes = MANY_RUNS["prefixes before"]
    plan = patternc.compile(source).patterns["default"]
    layout = plan.layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu")
    n, length = layout.n_tokens, tables.q_len
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = (0, 0, 0, length - n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flex_attention outside torch.compile: unfused
        out = flex_attention(
            *(torch.nn.functional.pad(t, pad) for t in (q, k, v)), block_mask=tables.block_mask(lookups=True)
        )
    assert isinstance(out, Tensor)
    mask = language_mask(plan, sizes)
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    assert relative_error(out[:, :, :n], ref) < 1e-10


INTERVAL_LAYOUTS = {
    **MANY_RUNS,
    "vlm": (
        "groups system run*{text, image}\nsystem -> system [causal]\n"
        "run*.text -> system, run*[before], self[causal]\nrun*.image -> system, run*[before], self",
        {"system": 5, "run0.text": 14, "run1.image": 25, "run2.text": 7, "run3.image": 0, "run4.text": 31},
    ),
    "windowed documents": (
        "groups doc* sink\nsink -> sink\ndoc* -> sink, self[window 5]",
        {"doc0": 9, "doc1": 0, "doc2": 30, "doc3": 1, "sink": 2},
    ),
    "dilated": ("groups a b\na -> a [dilate 2]\nb -> a, b [causal]", {"a": 9, "b": 4}),
    "documents": ("groups doc*\ndoc* -> self [causal]", _documents(40, seed=1)),
}


@pytest.mark.parametrize("name", list(INTERVAL_LAYOUTS))
def test_intervals_from_runs_equal_intervals_from_pairs(name: str) -> None:
    """The per-query key intervals read off the runs of key groups equal
    those read off every group pair (a run without modifiers is one read)."""
    from patternc.lower.blocks import group_segments
    from patternc.lower.intervals import Run, query_runs, query_runs_of_runs

    source, sizes = INTERVAL_LAYOUTS[name]
    layout = patternc.compile(source).patterns["default"].layout(sizes)
    queries, keys = group_segments(layout, {})
    ours, theirs = (
        query_runs_of_runs(queries, keys, pair_runs(layout)),
        query_runs(queries, keys, layout.pairs),
    )
    if theirs is None:
        assert ours is None
        return
    assert ours is not None and len(ours) == len(theirs) == len(queries)

    def intervals(runs: list[Run], p: int) -> list[tuple[int, int]]:
        """The key intervals ``[lo, hi]`` a query at position ``p`` reads (as :class:`Run` defines them)."""
        bounds = [
            (min(r.first + max(0, p + r.low), r.cap), max(r.last + min(r.last_top, p + r.high), r.floor))
            for r in runs
        ]
        return [(lo, hi) for lo, hi in bounds if lo <= hi]

    for (_, start, stop), mine, want in zip(queries, ours, theirs):
        for p in range(stop - start):
            assert intervals(mine, p) == intervals(want, p), (start, p)


SPLIT_LAYOUTS = {
    # a causal prompt (one banded rectangle) beside plain block-causal frames
    "frames": (
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
        {"prompt": 37, **{f"frame{i}": n for i, n in enumerate([21, 1, 50, 16, 0, 33])}},
    ),
    "documents": ("groups doc*\ndoc* -> self [causal]", _documents(23, seed=5)),
    "window across": (
        "groups frame*\nframe* -> frame*[upto 2, causal, across]",
        {f"frame{i}": n for i, n in enumerate([44, 100, 1, 29, 77, 3, 0, 30])},
    ),
    "image": (
        "groups image[12, 5] text\nimage -> image[kernel 5], text\ntext -> *",
        {"image": 60, "text": 9},
    ),
    "dilated": (
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, self[back 40, dilate 3]",
        {"prompt": 21, **{f"frame{i}": n for i, n in enumerate([70, 1, 45, 33])}},
    ),
}


def _block_reference(mask: Tensor, block: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """``(partial, full)`` blocks of a dense mask padded with False to ``rows x cols`` blocks."""
    padded = torch.zeros(rows * block, cols * block, dtype=torch.bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    counts = padded.view(rows, block, cols, block).sum(dim=(1, 3))
    return (counts > 0) & (counts < block * block), counts == block * block


@pytest.mark.parametrize("name", list(SPLIT_LAYOUTS))
@pytest.mark.parametrize(
    ("where", "dense"),
    [("python", True), ("host tensors", True), ("host tensors", False), ("device", True), ("device", False)],
)
def test_block_classes_are_the_same_wherever_rectangles_are_cut(
    name: str, where: str, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rectangles cut into blocks in Python (a dense grid's banded ones), as
    host tensors or on the device, into a dense grid or sorted, give the
    blocks of the mask written from the language's definition (blocks of 16
    tokens: many of them, and boundaries inside blocks). The thresholds are
    private: they pick the path, which the public API never names."""
    from patternc.nn import flexblocks

    python, host = {"python": (10**9, 10**9), "host tensors": (0, 10**9), "device": (0, 0)}[where]
    monkeypatch.setattr(flexblocks, "PYTHON_INCIDENCES", python)
    monkeypatch.setattr(flexblocks, "HOST_INCIDENCES", host)
    monkeypatch.setattr(flexblocks, "DENSE_CELLS_PER_BLOCK", 10**9 if dense else 0)
    source, sizes = SPLIT_LAYOUTS[name]
    plan = patternc.compile(source).patterns["default"]
    layout = plan.layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu", block=16)
    assert (tables.partial_blocks.dim() == 2) == dense
    partial, full = _block_reference(language_mask(plan, sizes), 16, *tables.block_shape)
    assert full.any() and partial.any()
    assert torch.equal(tables.full, full)
    assert torch.equal(tables.partial, partial)


@pytest.mark.parametrize("name", list(SPLIT_LAYOUTS))
def test_block_classes_traced_are_cut_on_the_device(name: str) -> None:
    """Inside ``torch.compile`` (``traced``) the host uploads the rectangles
    as they are and the device does every step: the same blocks as the
    language's mask. ``block_work`` is called directly: a trace is what
    decides this path, and no trace runs here."""
    from patternc.lower.blocks import allowed_rects
    from patternc.nn.flexblocks import block_work

    source, sizes = SPLIT_LAYOUTS[name]
    plan = patternc.compile(source).patterns["default"]
    layout = plan.layout(sizes)
    rows = cols = -(-layout.n_tokens // 16)
    work = block_work(allowed_rects(layout, {}, False, 16), 16, (rows, cols), traced=True)
    assert work.device_plain and work.dense
    partial, full = work.classify(work.pieces)
    want_partial, want_full = _block_reference(language_mask(plan, sizes), 16, rows, cols)
    assert torch.equal(full, want_full) and torch.equal(partial, want_partial)
