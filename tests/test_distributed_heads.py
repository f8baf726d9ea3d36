"""Head-parallel (all-to-all) context parallelism: gloo groups of 2, 3 and 4
processes spawned here (cases in tests/heads_cases.py) against one process in
float64, the bytes its all-to-alls move against the model that chooses the
mode, and that model on its own (torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port

import patternc
from patternc.distributed import place, schedule
from patternc.distributed.heads import choose_mode, head_parallel_rows, hybrid_rows, schedule_rows

sys.path.insert(0, str(Path(__file__).parent))
import heads_cases

TOLERANCE = 1e-12
NUMERIC = [
    "documents",
    "documents_auto",
    "vlm",
    "anchors",
    "joint_auto",
    "grouped_query",
    "padding",
    "device_mesh",
    "alibi_transformer",
    "empty_ranks",
]

CACHES = ["kv_cache", "full_cache_of_whole_documents"]

HYBRID = ["hybrid_documents", "hybrid_vlm_padded", "hybrid_joint"]
HYBRID_CACHE = ["hybrid_kv_cache"]


@pytest.fixture(scope="module", params=[2, 3, 4])
def ranks(request: Any, tmp_path_factory: Any) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"heads{world}")
    return world, heads_cases.spawn(world, [*NUMERIC, *CACHES, *HYBRID, *HYBRID_CACHE, "refused", "hybrid_refused"], str(out), free_port())


@pytest.mark.parametrize("case", NUMERIC)
def test_head_parallel_equals_one_process(ranks: tuple[int, list[dict[str, Any]]], case: str) -> None:
    world, results = ranks
    assert len(results) == world
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        errors = {k: metrics[k] for k in ("out", "unshard", "grad_x", "grad_params")}
        assert all(v <= TOLERANCE for v in errors.values()), (rank, world, errors)


@pytest.mark.parametrize("case", CACHES)
def test_head_parallel_caches_hold_every_head(ranks: tuple[int, list[dict[str, Any]]], case: str) -> None:
    """``full_kv_cache=True`` gathers every head of every group; queries
    reading a cache in head-parallel mode read their heads of it."""
    world, results = ranks
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        assert metrics["cache"] <= TOLERANCE and metrics["out"] <= TOLERANCE, (rank, world, metrics)
    for result in results:
        assert result["kv_cache"]["mode"] == "heads" and result["kv_cache"]["heads_bytes"] > 0
        assert result["full_cache_of_whole_documents"]["all_groups"]
        assert result["full_cache_of_whole_documents"]["own_groups"]


@pytest.mark.parametrize(
    "case", ["documents", "vlm", "anchors", "grouped_query", "device_mesh", "empty_ranks"]
)
def test_forced_head_parallel_moves_what_the_model_counts(
    ranks: tuple[int, list[dict[str, Any]]], case: str
) -> None:
    """Bytes that arrived in the two all-to-alls of one forward equal the
    rows the mode choice counts (batch 2, float64, model width); nothing else moves."""
    _, results = ranks
    for result in results:
        metrics = result[case]
        assert metrics["mode"] == "heads"
        assert metrics["heads_bytes"] == metrics["predicted_heads_bytes"] > 0
        assert metrics["other_bytes"] == 0


def test_the_padding_channel_travels_with_the_heads(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Q, K, V of width 2 per head and one mask channel: 7 / 6 of the unpadded q,k,v bytes."""
    _, results = ranks
    for result in results:
        padded, plain = result["padding"], result["vlm"]
        assert padded["mode"] == "heads"
        assert padded["heads_bytes"] > plain["heads_bytes"]
        assert padded["heads_bytes"] <= plain["heads_bytes"] * 7 / 6


def test_auto_picks_the_mode_that_moves_less(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Whole documents move nothing on the schedule: it runs. Everything
    attending to everything: the ring passes 2 (R - 1) / R of the rows per
    rank, the all-to-alls 4 (R - 1) / R**2: equal at 2 ranks (the schedule
    keeps the tie), head-parallel from 3."""
    world, results = ranks
    for result in results:
        documents = result["documents_auto"]
        assert documents["mode"] == "ring" and documents["heads_bytes"] == 0
        joint = result["joint_auto"]
        expected = "heads" if world > 2 else "ring"
        assert joint["mode"] == expected, (world, joint["reason"])
        ran_heads = joint["heads_bytes"] > 0
        assert ran_heads == (expected == "heads")
        assert (max(joint["head_rows"]) < max(joint["schedule_rows"])) == ran_heads


def test_head_parallel_refusals_say_why_and_what_to_do(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    heads = world + 1
    for result in results:
        refused = result["refused"]
        assert "exception" not in refused, refused["exception"]
        assert refused["forced"].startswith(
            f"mode='heads' cannot run this layout: {heads} heads do not divide over {world} ranks"
        )
        assert (
            "use mode='ring' or 'auto', or a number of heads that is a multiple of the" in refused["forced"]
        )
        assert refused["auto"].startswith(f"{heads} heads do not divide over {world} ranks")
        assert refused["unknown"] == "mode='ulysses': use 'auto', 'ring', 'heads' or 'hybrid'"
        assert "is not among the plans this ContextParallel was built from" in refused["other_plan"]


# ------------------------------------------------------- the model (torch-free)


def _schedule(source: str, sizes: dict[str, int], world: int) -> Any:
    plan = patternc.compile(source).patterns["default"].bind(list(sizes))
    return schedule(plan.calls, place(plan.groups, plan.calls, sizes, world))


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_head_parallel_rows_follow_the_tokens_each_rank_holds(world: int) -> None:
    """Rank r receives q, k, v of the tokens it lacks for its heads and the
    output of its tokens for the other ranks' heads; the total is 4 N (R - 1) / R."""
    sizes = {"a": 37, "b": 101}
    plan_schedule = _schedule("groups a b\n* -> *", sizes, world)
    placement = plan_schedule.placement
    rows = head_parallel_rows(placement)
    n = sum(sizes.values())
    for r, got in enumerate(rows):
        held = placement.tokens(r)
        assert got == pytest.approx((3 * (n - held) + (world - 1) * held) / world)
    assert sum(rows) == pytest.approx(4 * n * (world - 1) / world)
    assert schedule_rows(plan_schedule) == tuple(2.0 * t for t in plan_schedule.received)


def test_choose_mode_forced_and_auto() -> None:
    joint = _schedule("groups a b\n* -> *", {"a": 300, "b": 500}, 4)
    assert choose_mode(joint).mode == "heads"
    assert choose_mode(joint, "ring").reason == "forced (mode='ring')"
    assert choose_mode(joint, "auto", heads=6).mode == "ring"
    with pytest.raises(ValueError, match="6 heads do not divide over 4 ranks"):
        choose_mode(joint, "heads", heads=6)
    with pytest.raises(ValueError, match="mode='x': use 'auto', 'ring' or 'heads'"):
        choose_mode(joint, "x")  # type: ignore[arg-type]
    assert choose_mode(joint, strategy="ring").reason == "strategy='ring' asks for the schedule"
    assert choose_mode(joint, "heads", strategy="ring").mode == "heads"
    unavailable = choose_mode(joint, "auto", heads=8, unavailable="no plan")
    assert (unavailable.mode, unavailable.reason) == ("ring", "no plan")
    documents = _schedule("groups doc*\ndoc* -> self [causal]", heads_cases.LONG_TAILED, 4)
    choice = choose_mode(documents)
    assert choice.mode == "ring" and "schedule" in choice.summary()


def test_compile_world_size_reports_the_mode(tmp_path: Path) -> None:
    source = tmp_path / "joint.pc"
    source.write_text("groups a b\n* -> *  # noqa: W103\n")
    cmd = [
        sys.executable,
        "-m",
        "patternc",
        "compile",
        str(source),
        "--sizes",
        "a=3000,b=5000",
        "--world-size",
        "4",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    ).stdout
    assert (
        "mode='auto' picks 'heads' (the all-to-alls move less than the schedule; needs heads a multiple of 4"
        in out
    )
    # a ring of 8000 tokens: each rank receives the other 6000 tokens' K and V; the all-to-alls 4 x 8000 x 3 / 16 rows
    assert "schedule 4608000 4608000 4608000 4608000; head-parallel (all-to-all) 2304000 2304000" in out


# ------------------------------------------------------------ NCCL, one GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize(
    "source,sizes",
    [
        (heads_cases.VLM, {"registers": 16, "image": 1024, "text": 3000}),
        ("groups doc*\ndoc* -> self [causal]", {f"doc{i}": 300 + 37 * i for i in range(16)}),
    ],
    ids=["vlm", "documents"],
)
def test_nccl_world_of_one_head_parallel_matches_one_gpu(
    source: str, sizes: dict[str, int], backend: str
) -> None:
    """Head-parallel mode's NCCL all-to-alls around the GPU executor (world
    size 1: the same kernel on the same heads), float32, forward and backward."""
    import torch.distributed as dist

    from patternc.distributed import ContextParallel

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        torch.manual_seed(0)
        config = patternc.MixedAttentionConfig(hidden_dim=128, num_heads=4, implementation=backend)
        attn = patternc.nn.PatternAttention(config, plan).cuda()
        x = torch.randn(1, sum(sizes.values()), 128, device="cuda")
        probe = torch.randn_like(x)
        ref_x = x.clone().requires_grad_()
        ref, _ = attn(ref_x, sizes)
        (ref * probe).sum().backward()
        ref_grads = [p.grad.clone() for p in attn.parameters() if p.grad is not None]
        attn.zero_grad()
        cp = ContextParallel(plan, sizes, mode="heads", whole_groups=False)
        x_local = cp.shard(x).requires_grad_()
        with cp:
            out, _ = attn(x_local, cp.local_sizes)
        (out * cp.shard(probe)).sum().backward()
        assert cp.mode_for(plan.layout(cp.local_sizes), 4).mode == "heads"
        assert x_local.grad is not None and ref_x.grad is not None
        assert ((out - cp.shard(ref)).norm() / ref.norm()).item() < 1e-5
        assert ((x_local.grad - cp.shard(ref_x.grad)).norm() / ref_x.grad.norm()).item() < 1e-5
        grads = [p.grad for p in attn.parameters() if p.grad is not None]
        assert all(((g - r).norm() / r.norm()).item() < 1e-5 for g, r in zip(grads, ref_grads))
    finally:
        dist.destroy_process_group()


def test_hybrid_estimate_meets_both_modes_at_its_ends() -> None:
    """Heads over every rank: the head-parallel rows (even tokens); heads over
    groups of one rank: the schedule's; between, the schedule's keys/values
    for a share of the heads only."""
    plan = patternc.compile("groups x\nx -> x  # noqa: W103").patterns["default"]
    sizes = {"x": 4096}
    placement = place(plan.groups, plan.calls, sizes, 8)
    within, across = hybrid_rows(plan.groups, plan.calls, sizes, 8, 8)
    assert within == (head_parallel_rows(placement)[0],) and across == (0.0,)
    within, across = hybrid_rows(plan.groups, plan.calls, sizes, 8, 1)
    assert within == (0.0,) * 8 and across == schedule_rows(schedule(plan.calls, placement))
    within, across = hybrid_rows(plan.groups, plan.calls, sizes, 16, 4)
    assert within == (4 * 1024 * 3 / 16,) * 4 and across == (2 * 3072 / 4,) * 4
    with pytest.raises(ValueError, match="head_ranks=3 must divide world_size=8"):
        hybrid_rows(plan.groups, plan.calls, sizes, 8, 3)


@pytest.mark.parametrize("case", HYBRID)
def test_hybrid_on_a_2d_mesh_equals_one_process(ranks: tuple[int, list[dict[str, Any]]], case: str) -> None:
    """The schedule between groups of ranks, heads within each group: output,
    its unshard, input and parameter gradients as one process's (float64)."""
    world, results = ranks
    for rank, result in enumerate(results):
        metrics = result[case]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        errors = {k: metrics[k] for k in ("out", "unshard", "grad_x", "grad_params")}
        assert all(v <= TOLERANCE for v in errors.values()), (rank, world, errors)


def test_hybrid_moves_heads_within_groups_and_keys_between_them(
    ranks: tuple[int, list[dict[str, Any]]],
) -> None:
    """Every rank of a group of several exchanges heads; AB-UPT's anchors
    move between groups only where there are several groups (4 ranks: a 2 x
    2 mesh), and a group's tokens are cut in nearly equal pieces."""
    world, results = ranks
    for result in results:
        metrics = result["hybrid_joint"]
        groups, per_group = metrics["mesh"]
        assert groups * per_group == world and metrics["mode"] == "hybrid"
        assert metrics["heads_bytes"] > 0, metrics
        assert (metrics["other_bytes"] > 0) == (groups > 1), metrics
        tokens = result["hybrid_documents"]["tokens"]
        for g in range(groups):
            pieces = tokens[g * per_group : (g + 1) * per_group]
            assert max(pieces) - min(pieces) <= 1, tokens


def test_hybrid_refusals_say_why_and_what_to_do(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    refused = results[0]["hybrid_refused"]
    assert "exception" not in refused, refused.get("exception")
    assert "do not divide over the" in refused["heads"] and "second" in refused["heads"], refused
    assert "mode='hybrid' needs a two-dimensional DeviceMesh" in refused["one_dim"], refused
    assert "but got a process group" in refused["one_dim"], refused
    assert "of 3 dimensions" in refused["three_dims"], refused
    assert "this DeviceMesh has 2" in refused["unasked"] and "mode='hybrid'" in refused["unasked"], refused
    assert "in rank order" in refused["rank_order"] and "init_device_mesh" in refused["rank_order"], refused
    assert "does not build full key/value caches" in refused["full_cache"], refused
    assert "full_kv_cache=False" in refused["full_cache"], refused


def test_hybrid_moves_what_its_estimate_counts(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Between groups a rank moves exactly ``1 / ranks_per_group`` of what the
    schedule alone over the groups moves (the same collectives, on its share
    of the heads); within a group the all-to-alls move what ``hybrid_rows``
    counts, to a row of each piece (it spreads the group's tokens evenly)."""
    _, results = ranks
    for result in results:
        metrics = result["hybrid_joint"]
        per_group = metrics["mesh"][1]
        assert metrics["other_bytes"] * per_group == metrics["schedule_bytes"], metrics
        slack = 4 * per_group * metrics["row_bytes"]
        assert abs(metrics["heads_bytes"] - metrics["predicted_within"]) <= slack, metrics


def test_hybrid_reads_a_kv_cache_at_its_heads(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    for rank, result in enumerate(results):
        metrics = result["hybrid_kv_cache"]
        assert "exception" not in metrics, f"rank {rank} of {world}:\n{metrics['exception']}"
        assert metrics["out"] <= TOLERANCE, (rank, world, metrics)
