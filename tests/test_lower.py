"""The lowering floor: layouts linear in their groups, the bounded thread-safe
cache, and one module called from several threads with many layouts."""

from __future__ import annotations

import sys
import threading
import tracemalloc
from collections.abc import Callable

import pytest
import torch

import patternc
from patternc.lower.cache import BoundedCache
from patternc.lower.tables import Tables
from patternc.nn import PatternAttention
from patternc.nn.chunked import chunked
from patternc.plan import LAYOUTS, layout_weight

DOCS = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
ANCHORS = patternc.compile("groups anchors queries\n* -> anchors").patterns["default"]


def _documents(n: int, seed: int = 0) -> dict[str, int]:
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=rng).tolist()
    return {f"doc{i}": int(length) for i, length in enumerate(lengths)}


# ------------------------------------------------------------- linear layouts


def test_a_layout_of_documents_holds_one_pair_per_document() -> None:
    layout = DOCS.layout(_documents(3000))
    assert len(layout.pairs) == 3000
    assert all(q == k for q, k in layout.pairs)
    assert layout.allows(5, 5) and not layout.allows(5, 6)


def _peak_bytes(n: int) -> int:
    sizes = _documents(n, seed=n)
    LAYOUTS.clear()
    tracemalloc.start()
    DOCS.layout(sizes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    LAYOUTS.clear()
    return peak


def test_layout_memory_grows_linearly_with_documents() -> None:
    """Four times the documents cost about four times the memory (a table of
    group pairs would cost sixteen)."""
    small, large = _peak_bytes(500), _peak_bytes(2000)
    assert large / small < 6, (small, large)


def test_key_space_positions_of_many_documents() -> None:
    """``position`` and ``holds`` (a binary search) agree with a scan."""
    plan = patternc.compile("groups q doc*\nq -> doc*\ndoc* -> self").patterns["default"]
    sizes = {"q": 3, **_documents(50)}
    space = plan.layout(sizes).key_space
    before = 0
    for start, stop in space.ranges:
        assert space.holds(start, stop)
        for token in (start, (start + stop) // 2, stop):
            assert space.position(token) == before + token - start
        before += stop - start
    assert space.size == before
    assert not space.holds(0, 3)  # the queries are no keys
    with pytest.raises(ValueError, match="token 1 is not a key"):
        space.position(1)


# ------------------------------------------------------------------ the cache


def _in_threads(work: Callable[[int], None], count: int) -> list[BaseException]:
    """``work(i)`` in ``count`` threads at once; the errors they raised. The
    interpreter switches threads far more often than by default, so races
    between a check and a read have many chances to show."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as error:  # the caller reports it
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_bounded_cache_evicts_by_entries_and_by_weight() -> None:
    cache: BoundedCache[int, str] = BoundedCache("test", 3, weigh=len, max_weight=10)
    for key, value in enumerate(["aaaa", "bbbb", "cc"]):
        cache.get_or_build(key, lambda value=value: value)  # type: ignore[misc]
    assert cache.weight == 10 and len(cache) == 3
    cache.get_or_build(3, lambda: "d")  # a fourth entry: the oldest leaves
    assert cache.lookup(0) is None and cache.weight == 7
    cache.get_or_build(4, lambda: "eeeeeeeeeeee")  # heavier than the bound: kept alone
    assert [k for k, _ in cache.items()] == [4] and cache.weight == 12
    assert "1/3 entries" in repr(cache)


def test_bounded_cache_first_stored_entry_wins() -> None:
    cache: BoundedCache[str, list[int]] = BoundedCache("test", 4)
    first = cache.put("k", [1])
    assert cache.put("k", [2]) is first
    cache.replace("k", [3])
    assert cache.lookup("k") == [3]


def test_bounded_cache_under_threads_never_loses_an_entry_mid_read() -> None:
    cache: BoundedCache[int, int] = BoundedCache("test", 8)

    def work(offset: int) -> None:
        for i in range(4000):
            key = (i * 7 + offset) % 64
            assert cache.get_or_build(key, lambda key=key: key * 2) == key * 2  # type: ignore[misc]
            cache.values(), cache.items()

    assert not _in_threads(work, 4)
    assert len(cache) <= 8


def test_a_layouts_tables_are_bounded_by_entries_and_bytes() -> None:
    tables = Tables(max_entries=3, max_bytes=10)
    for key, weight in (("a", 4), ("b", 4), ("c", 2)):
        assert tables.get((key,), lambda key=key: key, weigh=lambda _, w=weight: w) == key  # type: ignore[misc]
    assert tables.nbytes == 10 and len(tables) == 3
    tables.get(("d",), lambda: "d", weigh=lambda _: 1)  # a fourth table: the oldest leaves
    assert tables.stored(("a",)) is None and tables.nbytes == 7
    tables.get(("e",), lambda: "e", weigh=lambda _: 12)  # heavier than the bound: kept alone
    assert list(tables.entries) == [("e",)] and tables.nbytes == 12
    assert tables.put(("e",), "other", 1) == "e"  # the first stored wins
    tables.clear()
    assert len(tables) == 0 and tables.nbytes == 0


def test_a_layouts_tables_are_weighed_with_it_and_leave_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout cache counts each layout with the tables executors stored
    in it, evicts layouts when their tables outgrow the bound, and an
    evicted layout's tables charge the cache nothing more."""
    LAYOUTS.clear()
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2)
    layer = PatternAttention(config, ANCHORS, backend="dense").double().eval()
    first, second = {"anchors": 3, "queries": 5}, {"anchors": 4, "queries": 6}
    with torch.no_grad():
        layer(torch.randn(1, 8, 16, dtype=torch.float64), first)
    layout = ANCHORS.layout(first)
    assert len(layout.tables) and layout.tables.nbytes > 0  # the dense mask's tables
    assert LAYOUTS.weight == layout_weight(layout) + layout.tables.nbytes
    monkeypatch.setattr(LAYOUTS, "max_weight", LAYOUTS.weight + layout_weight(ANCHORS.layout(second)) + 1)
    assert len(LAYOUTS) == 2
    with torch.no_grad():
        layer(torch.randn(1, 10, 16, dtype=torch.float64), second)  # its tables push the first out
    assert [key[1] for key, _ in LAYOUTS.items()] == [tuple(second.items())]
    weight = LAYOUTS.weight
    layout.tables.put(("after eviction",), 0, 1000)
    assert LAYOUTS.weight == weight
    LAYOUTS.clear()


def test_a_layout_that_left_the_cache_charges_nothing_to_its_successor() -> None:
    """A layout evicted and built again under the same key: the old one's
    tables filling later leave the new entry's weight alone."""
    LAYOUTS.clear()
    sizes = {"anchors": 3, "queries": 5}
    old = ANCHORS.layout(sizes)
    LAYOUTS.clear()
    new = ANCHORS.layout(sizes)
    assert new is not old
    weight = LAYOUTS.weight
    old.tables.put(("stale",), 0, 1_000_000)
    assert LAYOUTS.weight == weight
    new.tables.put(("fresh",), 0, 1000)
    assert LAYOUTS.weight == weight + 1000
    LAYOUTS.clear()


def test_the_trace_view_outlives_table_eviction_and_clearing() -> None:
    """Graphs guard on a layout's one trace view: it is the same object after
    the layout's tables were evicted or cleared, and it names its layout to
    plain-Python helpers by id while it lives."""
    from patternc.lower.tables import traced_owner
    from patternc.nn.traced_layouts import for_trace

    layout = ANCHORS.layout({"anchors": 2, "queries": 7})
    view = for_trace(layout)
    for i in range(layout.tables.max_entries + 1):
        layout.tables.put(("filler", i), i, 1)
    layout.tables.clear()
    assert for_trace(layout) is view
    assert view.tables.traced and traced_owner(view.tables.layout_id) is layout  # type: ignore[attr-defined]


# ------------------------------------------------------- threads on one module


def _layer(backend: str = "batched") -> PatternAttention:
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2)
    return PatternAttention(config, ANCHORS, backend=backend).double().eval()


def _inputs(count: int) -> list[tuple[torch.Tensor, dict[str, int]]]:
    rng = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        sizes = {"anchors": 3 + i % 5, "queries": 4 + (i * 3) % 11}
        out.append((torch.randn(1, sum(sizes.values()), 16, generator=rng, dtype=torch.float64), sizes))
    return out


@pytest.mark.parametrize("backend", ["batched", "dense"])
@pytest.mark.parametrize("with_chunked", [False, True], ids=["plain", "chunked"])
def test_four_threads_on_one_module_give_the_sequential_results(
    monkeypatch: pytest.MonkeyPatch, with_chunked: bool, backend: str
) -> None:
    """More layouts than the caches hold (so entries are evicted while other
    threads read them); half the threads run ``chunked`` beside plain calls;
    ``dense`` fills each layout's tables while layouts leave the cache."""
    monkeypatch.setattr(LAYOUTS, "size", 4)  # a layout's tables leave with it
    layer = _layer(backend)
    inputs = _inputs(24)

    def forward(x: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
        out: torch.Tensor = layer(x, sizes)[0]
        return out

    def run(i: int, chunk: bool) -> torch.Tensor:
        x, sizes = inputs[i]
        if chunk:
            return chunked(forward, x, sizes, ["queries"], chunk_size=5)
        return forward(x, sizes)

    with torch.no_grad():
        expected = [forward(x, sizes) for x, sizes in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(thread: int) -> None:
        chunk = with_chunked and thread % 2 == 1
        with torch.no_grad():
            for repeat in range(3):
                for i in range(len(inputs)):
                    results[thread, repeat * 100 + i] = run(i, chunk)

    errors = _in_threads(work, 4)
    assert not errors, errors
    assert len(results) == 4 * 3 * len(inputs)
    for (_, index), out in results.items():
        torch.testing.assert_close(out, expected[index % 100], rtol=1e-12, atol=1e-12)


def test_layout_weight_counts_a_layouts_records() -> None:
    few, many = DOCS.layout(_documents(10)), DOCS.layout(_documents(1000))
    assert layout_weight(many) > 50 * layout_weight(few) // 2


# ------------------------------------------------- compile across many sizes


def _documents_stream() -> list[dict[str, int]]:
    """Packed documents whose number and lengths change call by call."""
    return [
        {f"doc{j}": n for j, n in enumerate(lengths)}
        for lengths in [(3, 5), (4, 4), (2, 3, 3), (5, 1, 2, 4), (7,), (1, 1, 1, 1, 1, 3)]
    ]


@pytest.mark.parametrize(("backend", "dynamic"), [("eager", None), ("inductor", None), ("eager", True)])
def test_fullgraph_compile_across_changing_sizes_dicts(backend: str, dynamic: bool | None) -> None:
    """A new sizes dict (another number of documents, other lengths) is one
    recompile, never an error: Dynamo makes a changed int argument symbolic,
    and the layout's sizes are specialised where the trace crosses into the
    compiler's records. Inductor is torch.compile's default backend; with
    ``dynamic=True`` the tokens' dimension is symbolic from the first call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2)
    layer = PatternAttention(config, DOCS).double()
    compiled = torch.compile(layer, fullgraph=True, backend=backend, dynamic=dynamic)
    stream = _documents_stream()[: 3 if backend == "inductor" else None]
    for sizes in stream:
        x = torch.randn(2, sum(sizes.values()), 16, dtype=torch.float64)
        out, _ = compiled(x, sizes)
        expected, _ = layer(x, sizes)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ masks in Python


@pytest.mark.parametrize(
    ("source", "sizes"),
    [
        ("groups doc*\ndoc* -> self [causal]", {"doc0": 5, "doc1": 1, "doc2": 7}),
        ("groups a q\na -> a [window 3]\nq -> a, q [causal]", {"a": 6, "q": 5}),
        ("groups a q\na -> a\nq -> a", {"a": 4, "q": None}),
    ],
)
def test_dense_mask_matches_the_executors_mask(source: str, sizes: dict[str, int | None]) -> None:
    from patternc.nn.executors.dense import dense_mask

    layout = patternc.compile(source).patterns["default"].layout(sizes)
    lengths = {g: 3 for g, n in sizes.items() if n is None}
    mask = layout.dense_mask(lengths)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, dense_mask(layout, lengths, torch.device("cpu")))


def test_dense_mask_of_causal_documents_is_block_causal() -> None:
    """Written from the definition: token i sees token j of its own document at or before it."""
    lengths = [3, 1, 4]
    layout = DOCS.layout({f"doc{i}": n for i, n in enumerate(lengths)})
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    i = torch.arange(sum(lengths))
    expected = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    assert torch.equal(layout.dense_mask(), expected)


def test_dense_mask_needs_the_cache_lengths() -> None:
    layout = ANCHORS.layout({"anchors": None, "queries": 2})
    with pytest.raises(KeyError, match="anchors"):
        layout.dense_mask()


def test_plans_and_layouts_print_readably() -> None:
    assert repr(DOCS) == "Plan('default': doc* -> self [causal])"
    layout = DOCS.layout({f"doc{i}": 2 for i in range(12)})
    text = repr(layout)
    assert text.startswith("Layout('default': doc0=2, doc1=2,") and "... 4 more" in text
    assert "24 tokens" in text and len(text) < 200


def test_show_returns_the_mask_figure() -> None:
    pytest.importorskip("matplotlib")
    figure = patternc.show(patternc.compile("groups a b\na -> a [causal]\nb -> a, b"), {"a": 3, "b": 2})
    (axes,) = figure.axes
    assert axes.get_title().startswith("default") and axes.get_xlabel() == "keys / values"
    assert axes.images[0].get_array().shape == (5, 5)  # one cell per token at this size


# ------------------------------------------------------------ the cost model


def test_the_cost_model_prices_a_layout_without_torch() -> None:
    import subprocess
    import sys as system

    code = (
        "import sys, patternc\n"
        "from patternc.lower.costs import Workload, price, VarlenWork\n"
        "plan = patternc.compile('groups doc*\\ndoc* -> self [causal]').patterns['default']\n"
        "layout = plan.layout({f'doc{i}': 512 for i in range(8)})\n"
        "print([e.backend for e in price(layout, Workload(1, 12, 64, True), varlen=VarlenWork(1, 0))])\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([system.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "varlen" in result.stdout


def test_prices_are_sorted_and_training_costs_more() -> None:
    from patternc.lower.costs import VarlenWork, Workload, price

    layout = DOCS.layout(_documents(64))
    for half in (True, False):
        forward = price(layout, Workload(2, 12, 64, half), varlen=VarlenWork(1, 0))
        training = price(layout, Workload(2, 12, 64, half, training=True), varlen=VarlenWork(1, 0))
        assert [e.seconds for e in forward] == sorted(e.seconds for e in forward)
        times = {e.backend: e.seconds for e in forward}
        for e in training:
            assert e.seconds > times[e.backend]
    priced = {e.backend for e in price(layout, Workload(2, 12, 64, True))}
    assert "varlen" not in priced and {"batched", "flex", "dense"} <= priced
