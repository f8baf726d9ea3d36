"""Context-parallel execution on CPU: gloo groups of 2 and 4 processes spawned
here (cases in tests/distributed_cases.py), the placement and schedule on
their own (torch-free), and chunked inference on one process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port

import patternc
from patternc.distributed import place, schedule
from patternc.distributed.placement import halo_offsets, halo_slices
from patternc.modifiers import allowed_pairs

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cases

TOLERANCE = 1e-10
NUMERIC = [
    "self_anchor",
    "cross_anchor",
    "joint_anchor",
    "joint_ring",
    "documents",
    "documents_balanced",
    "windowed_documents_balanced",
    "unequal_branches",
    "device_mesh",
    "small_group",
    "causal_spanning",
    "per_key_modifiers",
    "block_causal_frames",
    "prefixed_documents",
    "window_across_a_global_token",
    "ring_window",
    "halo_window",
    "halo_window_global",
    "halo_across",
    "halo_long_band",
    "sub_ring",
    "ring_overlap",
    "gather_overlap",
    "inputs_read_nothing",
    "padding",
    "padding_documents",
    "untied_rope",
    "transformer",
    "transformer_alibi",
    "kv_cache",
    "full_cache_of_whole_documents",
    "chunked",
    "chunked_transformer",
    "image_neighbourhood",
    "video_neighbourhood_ring",
]
MESH = ["device_mesh_2d", "mesh_fsdp2"]
LOSSES = ["loss_ddp", "loss_fsdp2", "loss_all_reduce"]
REFUSED = ["mismatch", "padding_on_one_rank"]
OTHER = ["flex_forward"]


@pytest.fixture(scope="module", params=[2, 3, 4])
def ranks(request: Any, tmp_path_factory: Any) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    return world, distributed_cases.spawn(
        world, [*NUMERIC, *LOSSES, *REFUSED, *MESH, *OTHER], str(out), free_port()
    )


@pytest.mark.parametrize("case", NUMERIC)
def test_sharded_equals_one_process(ranks: tuple[int, list[dict[str, Any]]], case: str) -> None:
    world, results = ranks
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        errors = {
            k: v for k, v in metrics.items() if k in ("out", "grad_x", "grad_params", "cache", "unshard")
        }
        assert errors and all(v <= TOLERANCE for v in errors.values()), (rank, world, errors)
        if "minimum" in metrics:
            assert metrics["received"] >= metrics["minimum"]


def test_ring_computes_only_blocks_its_queries_read(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """A causal window of 8 over 64 zigzag tokens: at 3 or 4 ranks a rank reads 2
    or 3 of the 4 blocks (chunks 0 and 7 need one other chunk, the middle
    ones two) and computes only those; every block still passes by."""
    world, results = ranks
    computed = [r["ring_window"]["computed"] for r in results]
    expected = {2: [2, 2], 3: [2, 3, 2], 4: [2, 3, 3, 2]}[world]
    assert computed == expected
    blocks = [r["ring_window"]["block_bytes"] for r in results]
    for r, own in zip(results, blocks):  # every other rank's block passes by once
        assert r["ring_window"]["ring_bytes"] == sum(blocks) - own


def test_ring_posts_the_next_exchange_before_computing_the_current_block(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    """Double buffering, by the order of calls on every rank (spies on the
    kernel and on the P2P posts and waits): the forward posts step s + 1's
    block (tag 0) before it computes step s and waits for a block only at the
    step that reads it; the backward passes a block on as soon as it arrives,
    computes the step's gradient while the gradient the earlier ranks summed
    (tag 1) is on its way, then sends the sum on (after the last step, home)."""
    world, results = ranks
    steps = world  # full attention: every block goes all the way round
    forward = ["post0", "compute"] + ["wait0", "post0", "compute"] * (steps - 2) + ["wait0", "compute"]
    backward = (
        ["post0", "compute", "post1"]
        + ["wait0", "post0", "compute", "wait1", "post1"] * (steps - 2)
        + ["wait0", "compute", "wait1", "post1", "wait1"]
    )
    for rank, result in enumerate(results):
        case = result["ring_overlap"]
        assert "exception" not in case, f"rank {rank} of {world}:\n{case['exception']}"
        assert case["steps"] == [steps]
        assert case["forward_events"] == forward, (world, rank)
        assert case["backward_events"] == backward, (world, rank)
        events = case["forward_events"]
        for at, event in enumerate(events):  # never a compute before the next block is posted
            if event == "compute" and events[:at].count("compute") < steps - 1:
                assert events[:at].count("post0") == events[:at].count("compute") + 1


def test_gather_overlaps_the_calls_that_do_not_read_it(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Anchors gathered beside a ring call: the all-gather is posted before
    the ring's blocks compute and waited for only before the executor's call
    that reads the anchors; in the backward the reduce-scatter of their
    gradients is posted before the ring's backward computes and waited for
    after it (spies on the gather's posts and waits and on the kernels)."""
    world, results = ranks
    for rank, result in enumerate(results):
        case = result["gather_overlap"]
        assert "exception" not in case, f"rank {rank} of {world}:\n{case['exception']}"
        assert case["strategies"] == {"anchors, queries -> anchors": "gather", "text -> text": "ring"}
        ring = ["ring"] * world  # full attention: every rank computes every block
        assert case["forward_events"] == ["gather", *ring, "gathered", "executor"], (world, rank)
        assert case["backward_events"] == ["reduce", *ring, "reduced"], (world, rank)


def test_a_ring_runs_over_the_ranks_holding_its_document(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """A document split over some ranks passes its blocks among those only:
    the others neither send nor receive for it, forward or backward, and the
    bytes each rank receives per call are what the schedule reports."""
    world, results = ranks
    for rank, result in enumerate(results):
        case = result["sub_ring"]
        rings = case["rings"]
        sharing = {r for _, held in rings if rank in held for r in held} - {rank}
        assert set(case["peers"]) <= sharing, (world, rank, case["peers"], rings)
        assert case["traffic"] == case["scheduled"], (world, rank)
        for text, held in rings:
            if rank not in held:
                assert f"ring {text}" not in case["traffic"]
        if not sharing:
            assert case["sent"] == 0 and case["traffic"] == {}
    if world == 4:
        rings = results[0]["sub_ring"]["rings"]
        assert rings == [
            ["doc0 -> doc0[causal]", [0, 1]],
            ["doc5 -> doc5[causal]", [0, 1]],
            ["doc6 -> doc6[causal]", [2, 3]],
        ]
        for rank, other in ((0, 1), (1, 0), (2, 3), (3, 2)):
            case = results[rank]["sub_ring"]
            assert case["peers"] == [other] and case["sent"] > 0
            assert set(case["traffic"]) == {f"ring {text}" for text, held in rings if rank in held}


@pytest.mark.parametrize("case", ["halo_window", "halo_window_global", "halo_across", "halo_long_band"])
def test_a_halo_moves_only_the_keys_each_rank_reads(
    ranks: tuple[int, list[dict[str, Any]]], case: str
) -> None:
    """Windows and global tokens: every call that moves keys sends each rank
    only the keys its queries may read (a halo, or a ring where every block
    is read), so each rank receives the minimum per call; the bytes that
    arrived, per call, are those the schedule reports, and every exchange
    is with a rank holding tokens of the call (a window: the neighbours)."""
    world, results = ranks
    forward = step = 0
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        assert "halo" in metrics["strategies"], (world, rank, metrics["strategies"])
        assert metrics["traffic"] == metrics["scheduled"], (world, rank)
        assert metrics["forward_received"] == sum(metrics["traffic"].values())
        forward += metrics["forward_received"]
        step += metrics["step_received"]
        if case == "halo_window":  # the keys just before each of its two chunks
            assert metrics["received"] == metrics["minimum"] > 0

            # zigzag: rank r holds chunks r and 2R - 1 - r; it receives from the
            # holder of the chunk before each and sends to that of the chunk after
            def holder(c: int) -> int:
                return c if c < world else 2 * world - 1 - c

            chunks = (rank, 2 * world - 1 - rank)
            neighbours = {holder(c - 1) for c in chunks if c > 0} | {
                holder(c + 1) for c in chunks if c < 2 * world - 1
            }
            assert set(metrics["peers"]) == neighbours - {rank}, (world, rank, metrics["peers"])
    if case == "halo_window":  # the backward receives every block again and sends its gradient back
        assert step == 3 * forward


def test_ring_on_flex_forward_matches_float64(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """FlexAttention's CPU forward in float32 (no gradients) against one float64 process."""
    world, results = ranks
    for rank, result in enumerate(results):
        metrics = result["flex_forward"]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        assert metrics["out"] < 1e-5


def test_documents_communicate_nothing(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    for result in results:
        docs = result["documents"]
        assert docs["received"] == 0 and set(docs["strategies"]) == {"local"} and docs["kinds"] == ["whole"]


def test_large_documents_are_split_over_neighbouring_ranks_only(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    world, results = ranks
    for case in ("documents_balanced", "windowed_documents_balanced", "device_mesh"):
        holders, shards = results[0][case]["holders"], results[0][case]["shards"]
        split = [(h, s) for h, s in zip(holders, shards) if h > 1]
        if world == 2:  # no subset of two ranks to split over
            continue
        assert all(h < world for h, _ in split), (case, shards)
        if case != "windowed_documents_balanced":  # the window's FLOPs may balance whole
            assert split, (case, shards)
        for h, s in split:  # the ranks sharing a document are neighbours
            held = [r for r, n in enumerate(s) if n]
            assert held == list(range(held[0], held[0] + h)), (case, s)
        if split:  # uneven shards
            assert any(len({n for n in s if n}) > 1 for _, s in split), (case, shards)


def test_unequal_branches_are_split_in_uneven_shards(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    shards = results[0]["unequal_branches"]["shards"]
    # a rank holds the queries of a branch and none of its anchors, or more of one group than another
    assert any(max(s) - min(s) > 2 for s in shards), shards


def test_a_2d_device_mesh_shards_over_its_cp_dimension(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    if world != 4:
        pytest.skip("a 2 x 2 mesh needs 4 ranks")
    for rank, result in enumerate(results):
        metrics = result["device_mesh_2d"]
        assert "exception" not in metrics, f"rank {rank}:\n{metrics['exception']}"
        errors = [metrics[k] for k in ("out", "grad_x", "grad_params", "unshard")]
        assert max(errors) <= TOLERANCE, metrics
        assert metrics["cp_rank"] == rank % 2
        assert "this DeviceMesh has 2" in metrics["refused"] and 'mesh["cp"]' in metrics["refused"]


def test_fsdp2_on_a_2d_mesh_with_context_parallel_over_cp(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    if world != 4:
        pytest.skip("a 2 x 2 mesh needs 4 ranks")
    for rank, result in enumerate(results):
        metrics = result["mesh_fsdp2"]
        assert "exception" not in metrics, f"rank {rank}:\n{metrics['exception']}"
        assert metrics["grad_params"] <= TOLERANCE and metrics["loss"] <= TOLERANCE, metrics


def test_long_windowed_document_is_zigzag_with_a_halo(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Under a window a rank receives the keys before its chunks only (a ring would pass every block)."""
    _, results = ranks
    for result in results:
        case = result["causal_spanning"]
        assert "zigzag" in case["kinds"] and "halo" in case["strategies"]
        assert case["received"] == case["minimum"] > 0


def test_anchors_are_gathered_and_cached_queries_need_nothing(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    _, results = ranks
    for result in results:
        assert "gather" in result["cross_anchor"]["strategies"]
        assert result["kv_cache"]["received"] == 0
        # the gathered anchors are exactly what the queries need
        assert result["joint_anchor"]["received"] == result["joint_anchor"]["minimum"]


def test_ranks_that_disagree_get_a_clear_error(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    for result in results:
        message = result["mismatch"]["error"]
        assert "disagree on the placement" in message and f"rank {world - 1}:" in message
        assert "same plans and global sizes" in message


def test_sharded_chunked_transformer_refuses_positions_it_does_not_know(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    _, results = ranks
    for result in results:
        message = result["chunked_transformer"]["rope_error"]
        assert message.startswith('pos_emb_type="rope" reads each query\'s position in its group')
        assert 'run chunked without context_parallel, or use pos_emb_type="none"' in message


def _assert_padding_disagreement(world: int, results: list[dict[str, Any]]) -> None:
    assert len(results) == world
    for rank, result in enumerate(results):
        message = result["padding_on_one_rank"]["error"]
        assert message.startswith("the ranks disagree on the attention inputs"), (rank, message)
        assert "rank 0: no key_padding_mask, rank 1: a key_padding_mask" in message
        assert f"rank {world - 1}: " in message
        assert (
            "pass a key_padding_mask on every rank or on none (all True on a rank without padding)" in message
        )


def test_a_mask_on_one_rank_only_gives_every_rank_a_clear_error(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    _assert_padding_disagreement(*ranks)


def test_a_mask_on_one_rank_of_three_gives_every_rank_a_clear_error(tmp_path: Path) -> None:
    _assert_padding_disagreement(
        3, distributed_cases.spawn(3, ["padding_on_one_rank"], str(tmp_path), free_port())
    )


@pytest.mark.parametrize("case", LOSSES)
def test_global_mean_loss_gives_one_process_gradients(
    ranks: tuple[int, list[dict[str, Any]]], case: str
) -> None:
    """DDP (mean), FSDP2's fully_shard (mean, reduce-scatter) and an
    all_reduce of each .grad (sum): parameter gradients and the loss value
    equal one process's mean over all counted tokens."""
    world, results = ranks
    counts = set()
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        assert metrics["grad_params"] <= TOLERANCE and metrics["loss"] <= TOLERANCE, (rank, world, metrics)
        counts.add(metrics["local_tokens"])
        if "local_mean" in metrics:  # the recipe it replaces is off by about the number of ranks
            assert metrics["local_mean"] > 0.5, (rank, world, metrics)
    assert len(counts) > 1  # ranks count different numbers of tokens


def test_global_mean_loss_argument_errors(world_of_one: None) -> None:
    from patternc.distributed import global_mean_loss

    with pytest.raises(ValueError, match=r'grads must be "mean" \(DistributedDataParallel, fully_shard\)'):
        global_mean_loss(torch.zeros(()), 1, grads="avg")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"local_sum must be a scalar.*got shape \(3,\).*\(per_token \* keep\)"
    ):
        global_mean_loss(torch.zeros(3), 3, grads="sum")
    with pytest.raises(ValueError, match=r"local_count must be a scalar .*got shape \(2,\)"):
        global_mean_loss(torch.zeros(()), torch.ones(2), grads="sum")


def test_global_mean_loss_on_one_process(world_of_one: None) -> None:
    from patternc.distributed import global_mean_loss

    torch.manual_seed(0)
    for n in (1, 7, 30):
        per_token = torch.randn(n, dtype=torch.float64, requires_grad=True)
        keep = torch.rand(n) > 0.3
        for grads in ("mean", "sum"):
            per_token.grad = None
            loss = global_mean_loss((per_token * keep).sum(), keep.sum(), grads=grads)
            loss.backward()
            count = max(int(keep.sum()), 1)
            assert per_token.grad is not None
            assert torch.equal(per_token.grad, keep.double() / count)
            assert abs(loss.item() - (per_token * keep).sum().item() / count) < 1e-14
    # a weighted mean: the count is a total weight
    weights = torch.rand(5, dtype=torch.float64)
    per_token = torch.randn(5, dtype=torch.float64, requires_grad=True)
    global_mean_loss((per_token * weights).sum(), weights.sum(), grads="mean").backward()
    assert per_token.grad is not None and torch.allclose(per_token.grad, weights / weights.sum(), rtol=1e-15)


def test_global_mean_loss_without_init_process_group() -> None:
    from patternc.distributed import DistributedError, global_mean_loss

    with pytest.raises(DistributedError, match="init_process_group first"):
        global_mean_loss(torch.zeros(()), 1, grads="mean")


@pytest.mark.parametrize(
    ("case", "doing"),
    [
        ("rank_fails", "checking that every rank has the same attention inputs failed"),
        # the failure shows at the wait on an exchange posted a step earlier
        ("ring_rank_fails", "passing keys/values around the ring failed"),
    ],
)
def test_a_failed_rank_gives_an_error_not_a_hang(tmp_path: Path, case: str, doing: str) -> None:
    results = distributed_cases.spawn(2, [case], str(tmp_path), free_port())
    waiting = results[0][case]
    assert "exception" not in waiting, waiting.get("exception")
    assert waiting["error"].startswith("rank 0: ") and "Another rank probably failed" in waiting["error"]
    assert doing in waiting["error"], waiting["error"]
    assert waiting["seconds"] < 20
    assert "cannot be used again: end the process" in waiting["error"]


# ------------------------------------------------------- one process (no spawn)


def test_world_of_one_runs_the_module_as_it_is(world_of_one: None) -> None:
    from patternc.distributed import ContextParallel

    plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
    sizes = {"doc0": 5, "doc1": 8}
    attn = patternc.nn.PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan
    ).double()
    x = torch.randn(1, 13, 8, dtype=torch.float64)
    cp = ContextParallel(plan, sizes)
    with cp:
        out, _ = attn(cp.shard(x), cp.local_sizes)
    assert torch.allclose(out, attn(x, sizes)[0], rtol=0, atol=1e-12)
    assert cp.schedule_for(plan.layout(sizes)).received == (0,)


def test_module_called_with_other_sizes_says_what_to_pass(world_of_one: None) -> None:
    from patternc.distributed import ContextParallel

    plan = patternc.compile("groups a q\n* -> a").patterns["default"]
    attn = patternc.nn.PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
    cp = ContextParallel(plan, {"a": 3, "q": 4})
    with (
        cp,
        pytest.raises(
            ValueError, match=r"places \{'a': 3, 'q': 4\} on rank 0; call modules with cp.local_sizes"
        ),
    ):
        attn(torch.randn(1, 5, 8), {"a": 3, "q": 2})


def test_without_init_process_group_the_error_says_so() -> None:
    from patternc.distributed import ContextParallel, DistributedError

    plan = patternc.compile("groups a q\n* -> a").patterns["default"]
    with pytest.raises(DistributedError, match="init_process_group first"):
        ContextParallel(plan, {"a": 3, "q": 4})


def test_distributed_planning_does_not_import_torch_distributed_runtime() -> None:
    import subprocess

    code = (
        "import sys, patternc.distributed as d; import patternc; "
        "p = patternc.compile('groups a q\\n* -> a').patterns['default']; "
        "pl = d.place(p.groups, p.calls, {'a': 4, 'q': 9}, 4); print(pl.tokens(3)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "4" and out[1] == "False"


# --------------------------------------------------------- placement, schedule


def _plan(source: str) -> patternc.Plan:
    return patternc.compile(source).patterns["default"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_balances_causal_work(world: int) -> None:
    plan = _plan("groups doc\ndoc -> doc [causal]")
    size = 1000
    placement = place(plan.groups, plan.calls, {"doc": size}, world)
    shards = placement.group("doc")
    assert shards.kind == "zigzag"
    covered = sorted(p for rs in shards.ranges for a, b in rs for p in range(a, b))
    assert covered == list(range(size))
    # causal work of rank r: sum over its queries of (position + 1)
    work = [sum(p + 1 for a, b in rs for p in range(a, b)) for rs in shards.ranges]
    assert max(work) / min(work) < 1.01
    contiguous = [sum(p + 1 for p in range(r * size // world, (r + 1) * size // world)) for r in range(world)]
    assert max(contiguous) / min(contiguous) > 2


def test_documents_are_placed_whole_and_balanced_by_flops() -> None:
    plan = _plan("groups doc*\ndoc* -> self [causal]")
    sizes = {f"doc{i}": n for i, n in enumerate([30, 30, 25, 20, 20, 10, 10, 5, 5])}
    bound = plan.bind(list(sizes))
    # whole documents balance to 1.21 here; the default balance (1.1) would split some
    placement = place(bound.groups, bound.calls, sizes, 3, balance=1.3)
    assert {g.kind for g in placement.groups} == {"whole"}
    loads = [0, 0, 0]
    for g in placement.groups:
        owner = g.owner()
        assert owner is not None
        loads[owner] += allowed_pairs(g.size or 0, g.size or 0, patternc.modifiers.Modifiers(causal=True))
    assert max(loads) / (sum(loads) / 3) < 1.25
    plan_schedule = schedule(bound.calls, placement)
    assert plan_schedule.received == (0, 0, 0) and plan_schedule.minimum == (0, 0, 0)


def test_a_document_larger_than_a_share_is_split() -> None:
    plan = _plan("groups doc*\ndoc* -> self [causal]")
    sizes = {"doc0": 300, "doc1": 10, "doc2": 12}
    bound = plan.bind(list(sizes))
    placement = place(bound.groups, bound.calls, sizes, 2)
    assert placement.group("doc0").kind == "zigzag"
    assert placement.group("doc1").kind == "whole"
    plan_schedule = schedule(bound.calls, placement)
    # rank 1's middle half reads only rank 0's first quarter: a halo sends that, a ring all of it
    assert [c.strategy for c in plan_schedule.calls] == ["halo", "local", "local"]
    assert plan_schedule.received == plan_schedule.minimum
    ring = schedule(bound.calls, placement, strategy="ring")
    assert sum(ring.received) > sum(plan_schedule.received)


def test_anchor_schedule_counts_what_the_queries_need() -> None:
    plan = _plan("groups anchors queries\n* -> anchors")
    sizes = {"anchors": 10, "queries": 1000}
    placement = place(plan.groups, plan.calls, sizes, 4)
    plan_schedule = schedule(plan.calls, placement)
    (call,) = plan_schedule.calls
    assert call.strategy == "gather" and not call.blockwise
    # every rank holds a quarter of the anchors and needs them all
    expected = tuple(10 - placement.group("anchors").local_size(r) for r in range(4))
    assert plan_schedule.received == expected == plan_schedule.minimum
    assert plan_schedule.call_received(call, 0) == expected[0]


def test_causal_minimum_counts_only_earlier_keys() -> None:
    plan = _plan("groups doc\ndoc -> doc [causal]")
    placement = place(plan.groups, plan.calls, {"doc": 16}, 2)
    plan_schedule = schedule(plan.calls, placement, strategy="ring")
    # zigzag quarters: rank 0 holds [0,4) and [12,16): it needs [4,12) (8 tokens);
    # rank 1 holds [4,12): it needs [0,4) only
    assert plan_schedule.minimum == (8, 4)
    assert plan_schedule.received == (8, 8)


@pytest.mark.parametrize("world", [2, 3, 5, 8, 64])
def test_halo_receives_the_minimum_for_windows_and_global_tokens(world: int) -> None:
    """Each rank receives, per call, exactly the keys its queries may read
    and it does not hold: a window's neighbours (several ranks back when the
    window is longer than a shard), global tokens from their holder."""
    layouts = [
        ("groups a\na -> a [causal, window 40]", {"a": 157}),
        ("groups a\na -> a [back 300, ahead 3]", {"a": 1001}),
        ("groups a\na -> a [causal, window 33, dilate 3]", {"a": 211}),
        ("groups sink text\nsink -> *\ntext -> sink, text[causal, window 17]", {"sink": 2, "text": 401}),
        (
            "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 6, across]",
            {"left": 203, "sink": 3, "right": 190},
        ),
    ]
    for source, sizes in layouts:
        plan = _plan(source).bind(list(sizes))
        placement = place(plan.groups, plan.calls, sizes, world)
        plan_schedule = schedule(plan.calls, placement)
        for call in plan_schedule.calls:
            for rank in range(world):
                if call.strategy == "halo":
                    assert plan_schedule.call_received(call, rank) == plan_schedule.call_minimum(call, rank)
                    got = halo_slices(call.attention, placement, rank)
                    assert rank not in got
                    for sender, pieces in got.items():  # held by the sender, read by the rank
                        for i, (a, b) in pieces:
                            held = placement.group(call.attention.keys[i].name).ranges[sender]
                            assert any(c <= a and b <= d for c, d in held), (source, world, rank, sender)
                else:  # a ring or a gather only where every key it moves is read
                    assert plan_schedule.call_received(call, rank) == plan_schedule.call_minimum(call, rank)
        assert "halo" in [c.strategy for c in plan_schedule.calls], (source, world)
        ring = schedule(plan.calls, placement, strategy="ring")
        assert sum(plan_schedule.received) <= sum(ring.received), (source, world)


def test_a_halo_reaches_back_over_several_ranks_when_the_window_is_longer_than_a_shard() -> None:
    plan = _plan("groups a\na -> a [back 50, ahead 1]")
    placement = place(plan.groups, plan.calls, {"a": 100}, 5)  # contiguous shards of 20 (not causal)
    (call,) = schedule(plan.calls, placement).calls
    assert call.strategy == "halo"
    # rank 4 reads [30, 100): from the three ranks before it; rank 0 reads position 20 of rank 1
    assert halo_slices(call.attention, placement, 4) == {
        1: ((0, (30, 40)),),
        2: ((0, (40, 60)),),
        3: ((0, (60, 80)),),
    }
    assert halo_slices(call.attention, placement, 0) == {1: ((0, (20, 21)),)}
    # offsets 1 to 3 back, and 4 (one ahead, round the ring of 5); steps count the rank's own keys too
    assert halo_offsets(call.attention, placement, call.ranks) == (1, 2, 3, 4) and call.steps == 5


def test_forced_strategy_and_gather_limit() -> None:
    plan = _plan("groups a b\n* -> *")
    sizes = {"a": 10, "b": 10}
    placement = place(plan.groups, plan.calls, sizes, 2)
    assert schedule(plan.calls, placement).calls[0].strategy == "ring"
    assert schedule(plan.calls, placement, gather_limit=2.0).calls[0].strategy == "gather"
    assert schedule(plan.calls, placement, strategy="gather").calls[0].strategy == "gather"
    # full attention: a halo moves as much as the ring, which keeps the tie
    assert (
        schedule(plan.calls, placement, strategy="halo").received == schedule(plan.calls, placement).received
    )


def test_cached_groups_are_read_locally() -> None:
    plan = _plan("groups anchors queries\n* -> anchors")
    placement = place(plan.groups, plan.calls, {"anchors": None, "queries": 9}, 3)
    assert placement.group("anchors").kind == "cached"
    assert placement.local_sizes(2) == {"anchors": None, "queries": 3}
    assert schedule(plan.calls, placement).received == (0, 0, 0)


def test_world_size_must_be_positive() -> None:
    plan = _plan("groups a\na -> a")
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        place(plan.groups, plan.calls, {"a": 3}, 0)


# ----------------------------------------------------------- chunked inference


def _abupt_attention() -> tuple[patternc.nn.PatternAttention, dict[str, int]]:
    plan = _plan(
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_anchors -> surface_anchors\nvolume_anchors -> volume_anchors, surface_anchors\n"
        "surface_queries -> surface_anchors\nvolume_queries -> volume_anchors, surface_anchors"
    )
    torch.manual_seed(0)
    attn = patternc.nn.PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan
    ).double()
    return attn, {"surface_anchors": 5, "surface_queries": 23, "volume_anchors": 4, "volume_queries": 17}


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_chunked_attention_equals_one_shot(chunk: int) -> None:
    attn, sizes = _abupt_attention()
    x = torch.randn(2, sum(sizes.values()), 16, dtype=torch.float64)
    ref = attn(x, sizes)[0]
    out = patternc.nn.chunked(
        lambda x, s: attn(x, s)[0], x, sizes, ["surface_queries", "volume_queries"], chunk_size=chunk
    )
    assert ((out - ref).norm() / ref.norm()).item() < TOLERANCE


def test_chunked_block_stack_equals_one_shot() -> None:
    """Two transformer blocks (attention + MLP): each layer's anchor K/V recorded once."""
    from patternc.configs import TransformerBlockConfig

    attn, sizes = _abupt_attention()
    plan = attn.plan
    torch.manual_seed(1)
    blocks = torch.nn.ModuleList(
        patternc.nn.TransformerBlock(TransformerBlockConfig(hidden_dim=16, num_heads=2)) for _ in range(2)
    ).double()

    def model(x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        specs = [patternc.TokenSpec(name=g, size=n) for g, n in s.items()]
        for block in blocks:
            x = block(x, specs, plan)
        return x

    x = torch.randn(1, sum(sizes.values()), 16, dtype=torch.float64)
    ref = model(x, dict(sizes))
    out = patternc.nn.chunked(model, x, sizes, ["surface_queries", "volume_queries"], chunk_size=6)
    assert ((out - ref).norm() / ref.norm()).item() < TOLERANCE


def test_chunked_refuses_groups_that_attend_to_the_queries() -> None:
    plan = _plan("groups anchors queries\n* -> *")
    attn = patternc.nn.PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
    with pytest.raises(ValueError, match="`anchors` attends to `queries`.*cannot compute it once"):
        patternc.nn.chunked(
            lambda x, s: attn(x, s)[0], torch.randn(1, 7, 8), {"anchors": 3, "queries": 4}, ["queries"], 2
        )


def test_chunked_progress_line(capsys: Any) -> None:
    attn, sizes = _abupt_attention()
    x = torch.randn(1, sum(sizes.values()), 16, dtype=torch.float64)
    patternc.nn.chunked(
        lambda x, s: attn(x, s)[0],
        x,
        sizes,
        ["surface_queries", "volume_queries"],
        chunk_size=10,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "40/40 queries" in err or "query" in err


def test_chunked_argument_errors() -> None:
    attn, sizes = _abupt_attention()
    x = torch.randn(1, sum(sizes.values()), 16, dtype=torch.float64)

    def f(x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        return attn(x, s)[0]

    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        patternc.nn.chunked(f, x, sizes, ["surface_queries"], 0)
    with pytest.raises(ValueError, match=r"queries \['points'\] are not groups"):
        patternc.nn.chunked(f, x, sizes, ["points"], 4)
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 16\) but sizes add up to 49 tokens"):
        patternc.nn.chunked(f, x[:, :3], sizes, ["surface_queries"], 4)


# ------------------------------------------------------------ NCCL, one GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
@pytest.mark.parametrize(
    "source,sizes,strategy",
    [
        (
            "groups surface_anchors surface_queries\nsurface_* -> surface_anchors",
            {"surface_anchors": 1024, "surface_queries": 8192},
            None,
        ),
        ("groups doc*\ndoc* -> self [causal]", {f"doc{i}": 300 + 37 * i for i in range(16)}, None),
        ("groups a b\n* -> *  # noqa: W103", {"a": 1500, "b": 2600}, "ring"),
        (
            "groups image text\nimage -> image\ntext -> image, text[causal]",
            {"image": 700, "text": 1900},
            "gather",
        ),
        (
            "groups sink text\nsink -> *\ntext -> sink, text[causal, window 256]",
            {"sink": 4, "text": 3000},
            "halo",
        ),
    ],
    ids=["anchors", "documents", "ring", "per-key", "halo"],
)
def test_nccl_world_of_one_matches_one_gpu(source: str, sizes: dict[str, int], strategy: Any) -> None:
    """The NCCL code path (collectives, blockwise kernel; every group split,
    so nothing is local) in bf16 against a float32 run on the same GPU,
    forward and backward."""
    import torch.distributed as dist

    from patternc.distributed import ContextParallel

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        plan = _plan(source).bind(list(sizes))
        torch.manual_seed(0)
        attn = patternc.nn.PatternAttention(
            patternc.MixedAttentionConfig(hidden_dim=128, num_heads=2), plan
        ).cuda()
        x = torch.randn(1, sum(sizes.values()), 128, device="cuda")
        probe = torch.randn_like(x)
        ref_x = x.clone().requires_grad_()
        ref, _ = attn(ref_x, sizes)
        (ref * probe).sum().backward()
        half = attn.to(torch.bfloat16)
        cp = ContextParallel(plan, sizes, strategy=strategy, whole_groups=False)
        x16 = cp.shard(x).to(torch.bfloat16).requires_grad_()
        with cp:
            out, _ = half(x16, cp.local_sizes)
        (out.float() * cp.shard(probe)).sum().backward()
        assert ref_x.grad is not None and x16.grad is not None
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
        assert ((x16.grad.float() - ref_x.grad).norm() / ref_x.grad.norm()).item() < 3e-2
    finally:
        dist.destroy_process_group()


def test_one_rank_places_everything_whole_unless_asked_to_split() -> None:
    plan = _plan("groups anchors queries\n* -> anchors")
    sizes = {"anchors": 4, "queries": 9}
    one = place(plan.groups, plan.calls, sizes, 1)
    assert {g.kind for g in one.groups} == {"whole"}
    assert [c.strategy for c in schedule(plan.calls, one).calls] == ["local"]
    split = place(plan.groups, plan.calls, sizes, 1, whole_groups=False)
    assert {g.kind for g in split.groups} == {"split"}
    assert [c.strategy for c in schedule(plan.calls, split).calls] == ["gather"]


@pytest.mark.parametrize("pos_emb", ["rope", "sinusoidal"])
def test_chunked_transformer_stack_equals_one_shot(pos_emb: str) -> None:
    """The Transformer stack (untied, positions within groups) over queries in chunks."""
    program = patternc.compile(
        "groups anchors queries\ntypes { a: anchors\n q: queries }\nanchors -> anchors\nqueries -> anchors"
    )
    torch.manual_seed(0)
    model = distributed_cases.small_stack(program, pos_emb, num_layers=3, untied=True).eval()
    sizes = {"anchors": 6, "queries": 29}
    x = torch.randn(2, 35, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, sizes)
    out = patternc.nn.chunked(lambda x, s: model(x, s), x, sizes, ["queries"], chunk_size=8)
    assert ((out - ref).norm() / ref.norm()).item() < TOLERANCE


def test_chunked_refuses_modifiers_on_the_queries() -> None:
    plan = _plan("groups anchors queries\nanchors -> anchors\nqueries -> anchors[causal]")
    attn = patternc.nn.PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
    with pytest.raises(ValueError, match=r"has modifiers, which read the positions of `queries`"):
        patternc.nn.chunked(
            lambda x, s: attn(x, s)[0], torch.randn(1, 7, 8), {"anchors": 3, "queries": 4}, ["queries"], 2
        )


def test_transformer_takes_cached_groups_only_inside_chunked() -> None:
    model = patternc.nn.Transformer(
        patternc.nn.TransformerConfig(vocab_size=None, d_model=16, num_heads=2, num_layers=1, d_ff=32),
        patternc.compile("groups anchors queries\n* -> anchors"),
    )
    with pytest.raises(ValueError, match="has size None: the stack takes every group in x"):
        model(torch.randn(1, 4, 16), {"anchors": None, "queries": 4})
