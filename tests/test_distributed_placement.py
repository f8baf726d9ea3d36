"""The placement's balance, without processes: FLOPs and tokens per rank
(counted from the positions each rank holds) against the mean, on
long-tailed documents and AB-UPT branches at 8 to 64 ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import patternc
from patternc.distributed import place, schedule
from patternc.distributed.placement import GroupShards, Placement, halo_slices, rank_loads, ring_steps
from patternc.ir import AttentionCall
from patternc.modifiers import band_allows, pair_band

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_distributed import long_tailed  # the documents the benchmark places

DOCUMENTS = "groups doc*\ndoc* -> self [causal]"
ABUPT = "groups surface_anchors surface_queries volume_anchors volume_queries\n"
SELF_ANCHOR = ABUPT + "surface_* -> surface_anchors\nvolume_* -> volume_anchors"
CROSS_ANCHOR = ABUPT + "surface_* -> surface_anchors\nvolume_* -> volume_anchors, surface_anchors"


def _bound(source: str, sizes: dict[str, int]) -> patternc.Plan:
    return patternc.compile(source).patterns["default"].bind(list(sizes))


def _check_partition(placement: Placement, components: bool = True) -> None:
    """Every position of every group on exactly one rank; with ``components``
    (every group is one), the ranks that share a group are neighbours."""
    for g in placement.groups:
        held = sorted(p for ranges in g.ranges for a, b in ranges for p in range(a, b))
        assert held == list(range(g.size or 0)), g.name
        if not components:
            continue
        ranks = [r for r, ranges in enumerate(g.ranges) if ranges]
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks))) if ranks else True, (g.name, ranks)
        assert (g.kind == "whole") == (len(ranks) <= 1), (g.name, g.kind, ranks)


@pytest.mark.parametrize("world", [8, 16, 32, 64])
@pytest.mark.parametrize(("sigma", "seed"), [(1.0, 0), (1.0, 1), (1.5, 0), (1.5, 1), (2.0, 2)])
def test_long_tailed_documents_balance_flops_and_tokens(world: int, sigma: float, seed: int) -> None:
    sizes = long_tailed(seed, sigma)
    plan = _bound(DOCUMENTS, sizes)
    placement = place(plan.groups, plan.calls, sizes, world)
    _check_partition(placement)
    loads = rank_loads(plan.calls, placement)
    assert loads.flops_ratio <= 1.1 and loads.tokens_ratio <= 1.1, (loads.flops_ratio, loads.tokens_ratio)
    # each rank boundary cuts at most two documents: at most 2 (R - 1) extra shards
    shards = sum(sum(1 for ranges in g.ranges if ranges) for g in placement.groups)
    assert shards <= len(sizes) + 2 * (world - 1)
    # a document is split over the ranks it needs, not over all of them
    largest = max(sizes, key=lambda g: sizes[g])
    assert sum(1 for ranges in placement.group(largest).ranges if ranges) < world


@pytest.mark.parametrize("world", [8, 16, 32, 64])
@pytest.mark.parametrize("source", [SELF_ANCHOR, CROSS_ANCHOR])
def test_unequal_abupt_branches_balance(world: int, source: str) -> None:
    sizes = {
        "surface_anchors": 16384,
        "surface_queries": 65536,
        "volume_anchors": 16384,
        "volume_queries": 262144,
    }
    plan = patternc.compile(source).patterns["default"]
    placement = place(plan.groups, plan.calls, sizes, world)
    _check_partition(placement, components=False)
    loads = rank_loads(plan.calls, placement)
    assert loads.flops_ratio <= 1.1 and loads.tokens_ratio <= 1.1, (loads.flops_ratio, loads.tokens_ratio)


def test_documents_that_balance_whole_stay_whole() -> None:
    sizes = {"doc0": 40, "doc1": 30, "doc2": 35, "doc3": 20}
    plan = _bound(DOCUMENTS, sizes)
    placement = place(plan.groups, plan.calls, sizes, 2)
    assert {g.kind for g in placement.groups} == {"whole"}
    assert schedule(plan.calls, placement).received == (0, 0)
    loads = rank_loads(plan.calls, placement)
    assert loads.flops_ratio <= 1.1 and loads.tokens_ratio <= 1.1


def test_balance_trades_whole_documents_for_evenness() -> None:
    sizes = {f"doc{i}": n for i, n in enumerate([30, 30, 25, 20, 20, 10, 10, 5, 5])}
    plan = _bound(DOCUMENTS, sizes)
    ratios, split = [], []
    for balance in (1.1, 1.3, 100.0):
        placement = place(plan.groups, plan.calls, sizes, 3, balance=balance)
        _check_partition(placement)
        loads = rank_loads(plan.calls, placement)
        ratios.append(max(loads.flops_ratio, loads.tokens_ratio))
        split.append(sum(g.kind != "whole" for g in placement.groups))
        assert ratios[-1] <= balance
    assert split[0] > split[1] == split[2] == 0 and ratios[0] < ratios[1]


def test_a_loose_balance_keeps_even_a_large_document_whole() -> None:
    sizes = {"doc0": 300, "doc1": 10, "doc2": 12}
    plan = _bound(DOCUMENTS, sizes)
    assert place(plan.groups, plan.calls, sizes, 2).group("doc0").kind == "zigzag"
    loose = place(plan.groups, plan.calls, sizes, 2, balance=1000.0)
    assert {g.kind for g in loose.groups} == {"whole"}


def test_one_component_is_cut_into_neighbouring_stretches() -> None:
    plan = patternc.compile("groups a q\n* -> a").patterns["default"]
    placement = place(plan.groups, plan.calls, {"a": 4, "q": 9}, 4)
    _check_partition(placement, components=False)
    assert [placement.tokens(r) for r in range(4)] == [3, 3, 3, 4]
    # the groups follow each other: the anchors on the first ranks, the queries on the next
    assert [placement.group("a").local_size(r) for r in range(4)] == [3, 1, 0, 0]
    assert [placement.group("q").local_size(r) for r in range(4)] == [0, 2, 3, 4]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_loads_count_every_allowed_pair(world: int) -> None:
    source = "groups doc* sink\nsink -> *\ndoc* -> sink, self [causal, window 4]"
    sizes = {"doc0": 17, "doc1": 5, "doc2": 11, "sink": 2}
    plan = _bound(source, sizes)
    placement = place(plan.groups, plan.calls, sizes, world)
    _check_partition(placement, components=False)
    loads = rank_loads(plan.calls, placement)
    expected = [0] * world
    for call in plan.calls:
        for q in call.queries:
            for key in call.keys:
                band = pair_band(key.modifiers)
                for r, ranges in enumerate(placement.group(q).ranges):
                    expected[r] += sum(
                        bool(band_allows(band, i, j))
                        for a, b in ranges
                        for i in range(a, b)
                        for j in range(sizes[key.name])
                    )
    assert list(loads.flops) == expected
    assert list(loads.tokens) == [placement.tokens(r) for r in range(world)]
    assert sum(loads.tokens) == sum(sizes.values())


def test_balance_must_be_at_least_one() -> None:
    plan = patternc.compile("groups a\na -> a").patterns["default"]
    with pytest.raises(ValueError, match=r"balance must be >= 1 \(a multiple of the mean load\), got 0.5"):
        place(plan.groups, plan.calls, {"a": 3}, 2, balance=0.5)


@pytest.mark.parametrize("world", [4, 8, 16])
def test_a_ring_receives_only_among_the_ranks_holding_its_call(world: int) -> None:
    """Each ring call's blocks pass among its ranks: a rank outside them
    receives nothing for it, one inside the blocks of all the others (a
    causal document is read from every shard), and never less than it needs.
    By default the same calls are halos, which receive exactly what they need."""
    sizes = long_tailed(0, 1.0, count=24, total=4096)
    plan = _bound(DOCUMENTS, sizes)
    placement = place(plan.groups, plan.calls, sizes, world)
    halos = schedule(plan.calls, placement)
    for call in halos.calls:
        assert call.strategy in ("local", "halo")
        for rank in range(world):
            received = halos.call_received(call, rank)
            assert received == halos.call_minimum(call, rank)
            assert rank in call.ranks or received == 0
    plan_schedule = schedule(plan.calls, placement, strategy="ring")
    rings = [c for c in plan_schedule.calls if c.strategy == "ring"]
    assert rings and any(len(c.ranks) < world for c in rings)
    for call in rings:
        assert call.steps == len(call.ranks)
        for rank in range(world):
            received = plan_schedule.call_received(call, rank)
            if rank not in call.ranks:
                assert received == 0
            else:
                assert received == sum(placement.group(k).missing(rank) for k in call.key_groups)
            assert received >= plan_schedule.call_minimum(call, rank)


def test_a_window_rings_only_as_far_as_it_reads() -> None:
    """Contiguous shards of 16 under a causal window of 4: a rank reads the
    previous rank's block only, so blocks travel one step and each rank
    receives one block (rank 0 too: the ring's step is the same everywhere)."""
    plan = _bound("groups a\na -> a [causal, window 4]", {"a": 64})
    shards = GroupShards("a", 64, "split", tuple(((16 * r, 16 * r + 16),) for r in range(4)))
    placement = Placement(4, (shards,))
    assert ring_steps(plan.calls[0], placement, (0, 1, 2, 3)) == 2
    assert ring_steps(plan.calls[0], placement, (0, 1)) == 2
    assert ring_steps(plan.calls[0], placement, (3,)) == 1
    plan_schedule = schedule(plan.calls, placement, strategy="ring")
    call = plan_schedule.calls[0]
    assert call.ranks == (0, 1, 2, 3) and call.steps == 2
    assert plan_schedule.received == (16, 16, 16, 16)
    assert plan_schedule.minimum == (0, 3, 3, 3)  # a window of 4 reads 3 keys before a query


# --------------------------------------------- owner index against brute force


def _halo_by_every_rank(call: AttentionCall, placement: Placement, rank: int) -> dict[int, tuple]:
    """The keys of ``call`` that ``rank``'s queries may read and each other
    rank holds, found by testing every position against every rank."""
    starts: dict[str, int] = {}
    at = 0
    for g in placement.groups:
        starts[g.name] = at
        at += g.size or 0
    read: dict[int, set[int]] = {}
    for q in call.queries:
        shards = placement.group(q)
        if shards.size is None:
            continue
        for i, key in enumerate(call.keys):
            n_k = placement.group(key.name).size
            if n_k is None:
                continue
            band = pair_band(key.modifiers, starts[key.name] - starts[q])
            for a, b in shards.ranges[rank]:
                if b <= a:
                    continue
                lo = 0 if band.low is None else max(0, a + band.low)
                hi = n_k if band.high is None else min(n_k, b + band.high)
                read.setdefault(i, set()).update(range(lo, hi))
    out: dict[int, list] = {}
    for source in range(placement.world_size):
        if source == rank:
            continue
        for i in sorted(read):
            for c, d in placement.group(call.keys[i].name).ranges[source]:
                inside = sorted(p for p in read[i] if c <= p < d)
                runs: list[list[int]] = []
                for p in inside:
                    if runs and runs[-1][1] == p:
                        runs[-1][1] = p + 1
                    else:
                        runs.append([p, p + 1])
                out.setdefault(source, []).extend((i, (a, b)) for a, b in runs)
    return {s: tuple(pieces) for s, pieces in out.items() if pieces}


def _ring_steps_by_every_rank(call: AttentionCall, placement: Placement, ranks: tuple[int, ...]) -> int:
    """One more than the farthest ring offset at which some rank's queries
    may read a key another rank holds, every pair of ranks tested."""
    steps = 1
    for at, rank in enumerate(ranks):
        for step in range(1, len(ranks)):
            source = ranks[(at - step) % len(ranks)]
            single = Placement(
                placement.world_size,
                tuple(
                    GroupShards(
                        g.name,
                        g.size,
                        g.kind,
                        tuple(
                            g.ranges[r] if r in (rank, source) else () for r in range(placement.world_size)
                        ),
                    )
                    for g in placement.groups
                ),
            )
            if _halo_by_every_rank(call, single, rank).get(source):
                steps = max(steps, step + 1)
    return steps


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_halo_slices_and_ring_steps_from_the_owner_index_equal_a_rank_by_rank_search(world: int) -> None:
    """The owner index (a bisect over every rank's ranges) finds exactly the
    keys and ring offsets that testing every pair of ranks finds, on
    windows, bands, global tokens and uneven, zigzag and whole shards."""
    layouts = [
        ("groups a\na -> a [causal, window 7]", {"a": 97}),
        ("groups a\na -> a [back 30, ahead 3]", {"a": 131}),
        ("groups a\na -> a [ahead 5]", {"a": 64}),
        ("groups sink text\nsink -> *\ntext -> sink, text[causal, window 9]", {"sink": 3, "text": 151}),
        (
            "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 6, across]",
            {"left": 53, "sink": 2, "right": 61},
        ),
        (DOCUMENTS, long_tailed(world, 1.5, count=7, total=173)),
    ]
    for source, sizes in layouts:
        plan = _bound(source, sizes)
        for whole in (True, False):
            placement = place(plan.groups, plan.calls, sizes, world, whole_groups=whole)
            for call in plan.calls:
                for rank in range(world):
                    assert halo_slices(call, placement, rank) == _halo_by_every_rank(call, placement, rank), (
                        source,
                        rank,
                    )
                ranks = tuple(range(world))
                assert ring_steps(call, placement, ranks) == _ring_steps_by_every_rank(call, placement, ranks)
                assert ring_steps(call, placement, ranks[1:]) == _ring_steps_by_every_rank(
                    call, placement, ranks[1:]
                )


@pytest.mark.parametrize("world", [5, 8])
def test_fewer_tokens_than_ranks_are_placed_once_each(world: int) -> None:
    """With fewer tokens than ranks some ranks hold none: every cut stays
    inside the tokens left, and every token is on exactly one rank."""
    layouts = [
        (DOCUMENTS, {"doc0": 4}),
        (DOCUMENTS, {"doc0": 1, "doc1": 2}),
        (
            "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
            {"prompt": 3, "frame0": 2},
        ),
        (
            "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[before], self[causal]",
            {"prompt": 2, "frame0": 3, "frame1": 1, "frame2": 1},
        ),
    ]
    for source, sizes in layouts:
        plan = _bound(source, sizes)
        placement = place(plan.groups, plan.calls, sizes, world)
        _check_partition(placement, components=False)
        assert sum(placement.tokens(r) for r in range(world)) == sum(sizes.values())
        assert sum(1 for r in range(world) if placement.tokens(r)) <= sum(sizes.values())


def test_halo_slices_are_kept_per_call_rank_and_senders() -> None:
    """The placement keeps what a halo sends each rank (the schedule asks
    twice per call and rank): a second ask returns the same answer, equal to
    one computed afresh, and other senders or another call are asked anew."""
    from patternc.distributed.placement import _halo_slices

    plan = patternc.compile("groups g t\ng -> g, t\nt -> g, t[causal, window 8]").patterns["default"]
    sizes = {"g": 4, "t": 200}
    layout = plan.layout(sizes)
    calls = [c.attention for c in layout.calls]
    placement = place(layout.all_groups, calls, sizes, 4)
    for call in calls:
        for rank in range(4):
            first = halo_slices(call, placement, rank, range(4))
            assert halo_slices(call, placement, rank, [0, 1, 2, 3]) is first
            assert first == _halo_slices(call, placement, rank, frozenset(range(4)))
            fewer = halo_slices(call, placement, rank, [rank])
            assert fewer == {} and fewer is not first
    assert halo_slices(calls[1], placement, 3, range(4)) != halo_slices(calls[0], placement, 3, range(4))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_held_and_missing_tokens_sum_the_groups_named(world: int) -> None:
    """Tokens of a set of groups on each rank come from prefix sums over runs
    of consecutive groups; they must equal the group-by-group sums, with a
    group named twice counted twice, gaps between runs, a cached group (no
    tokens anywhere) and an empty one."""
    import random

    names = ["prompt", *(f"frame{i}" for i in range(9)), "cache", "empty"]
    source = "groups prompt frame* cache empty\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]\n"
    source += "cache -> cache\nempty -> empty"
    sizes: dict[str, int | None] = {
        "prompt": 5,
        **{f"frame{i}": 3 + i for i in range(9)},
        "cache": None,
        "empty": 0,
    }
    plan = patternc.compile(source).patterns["default"].bind(names)
    placement = place(plan.groups, plan.calls, sizes, world)
    rng = random.Random(world)
    for _ in range(40):
        chosen = [rng.choice(names) for _ in range(rng.randint(0, 8))]
        held = tuple(sum(placement.group(n).local_size(r) for n in chosen) for r in range(world))
        missing = tuple(sum(placement.group(n).missing(r) for n in chosen) for r in range(world))
        assert placement.held_tokens(chosen) == held
        assert placement.missing_tokens(chosen) == missing
    assert placement.missing_tokens([]) == (0,) * world


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize(
    ("source", "count"),
    [
        ("groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]", 7),
        ("groups sink doc*\nsink -> *\ndoc* -> sink, self[causal, window 4]", 5),
        ("groups prompt frame*\nprompt -> self\nframe* -> prompt, frame*[before], self[causal]", 6),
    ],
)
def test_schedule_minimum_counts_the_keys_a_rank_reads_and_does_not_hold(
    source: str, count: int, world: int
) -> None:
    """The schedule's ``minimum``, counted from runs of groups read whole and
    intervals of the others, against the keys each rank's queries may read
    under the language's own mask (``reference.language_mask``), less those
    it holds."""
    import random

    from reference import language_mask

    plan = patternc.compile(source).patterns["default"]
    rng = random.Random(world * 100 + count)
    family = "frame" if "frame" in source else "doc"
    first = "prompt" if family == "frame" else "sink"
    sizes = {first: rng.randint(1, 4), **{f"{family}{i}": rng.randint(1, 9) for i in range(count)}}
    bound = plan.bind(list(sizes))
    placement = place(bound.groups, bound.calls, sizes, world)
    sharded = schedule(bound.calls, placement, strategy="ring")
    mask = language_mask(plan, sizes)
    offsets = placement.offsets
    for rank in range(world):
        held = {offsets[g.name] + p for g in placement.groups for a, b in g.ranges[rank] for p in range(a, b)}
        queries = torch.tensor(sorted(held), dtype=torch.long)
        read = mask[queries].any(0).nonzero().flatten().tolist() if len(queries) else []
        assert sharded.minimum[rank] == len(set(read) - held)
