"""Head-parallel context-parallel cases, run on every rank of a gloo group
spawned by tests/test_distributed_heads.py.

Each numeric case compares one process against the sharded run with
``distributed_cases.compare`` (float64: output, input and parameter
gradients, as relative errors over all ranks), here with modules of 6 or 12
heads so that the heads divide over 2, 3 and 4 ranks, and reports the mode
each layout ran in and the bytes its all-to-alls moved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import distributed_cases
import torch
import torch.distributed as dist
from distributed_cases import ABUPT, LONG_TAILED, Forward, compare, rope_at_global_positions
from torch import Tensor, nn

import patternc
from patternc import MixedAttentionConfig, TokenSpec
from patternc.distributed import ContextParallel
from patternc.distributed.heads import head_parallel_rows, hybrid_rows
from patternc.nn import MixedAttention

HEAD_DIM = 2
VLM = "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]"
VLM_SIZES = {"registers": 3, "image": 17, "text": 29}
ABUPT_JOINT = "groups surface_anchors surface_queries volume_anchors volume_queries\n* -> surface_anchors, volume_anchors"


def _heads_for(world: int) -> int:
    """6 heads where they divide (2 and 3 ranks), else 12."""
    return 6 if 6 % world == 0 else 12


def _module(
    source: str, sizes: dict[str, int], heads: int, kv_heads: int | None = None, rope: bool = False
) -> tuple[nn.Module, Forward, Any, int]:
    """A float64 attention module of ``heads`` heads of width 2 over ``source``."""
    plan = patternc.compile(source).patterns["default"].bind(list(sizes))
    torch.manual_seed(0)
    hidden = heads * HEAD_DIM
    config = MixedAttentionConfig(hidden_dim=hidden, num_heads=heads, use_rope=rope)
    attn = MixedAttention(config, num_kv_heads=kv_heads).double()

    def forward(x: Tensor, sizes: dict[str, Any]) -> Tensor:
        padding = None
        if "padding" in sizes:
            sizes, padding = sizes["sizes"], sizes["padding"]
        freqs = rope_at_global_positions(x, sizes, HEAD_DIM) if rope else None
        specs = [TokenSpec(name=g, size=n) for g, n in sizes.items()]
        return attn(x, specs, plan, key_padding_mask=padding, freqs=freqs)[0]

    return attn, forward, plan, hidden


def _run(
    source: str,
    sizes: dict[str, int],
    heads: int,
    options: dict[str, Any],
    kv_heads: int | None = None,
    rope: bool = False,
    padded: bool = False,
) -> dict[str, Any]:
    """``compare`` in the given mode, with the mode each rank ran, its
    all-to-all bytes and the bytes the model of :mod:`patternc.distributed.heads` predicts."""
    module, forward, plan, hidden = _module(source, sizes, heads, kv_heads, rope)
    padding = None
    if padded:
        generator = torch.Generator().manual_seed(5)
        padding = torch.rand(2, sum(sizes.values()), generator=generator) > 0.3
    result = compare(module, forward, plan, sizes, options, padding=padding, dim=hidden)
    cp = ContextParallel(plan, sizes, **options)
    x = cp.shard(torch.randn(2, sum(sizes.values()), hidden, dtype=torch.float64))
    with torch.no_grad(), cp:
        if padding is None:
            forward(x, cp.local_sizes)
        else:
            forward(x, {"sizes": cp.local_sizes, "padding": cp.shard(padding)})
    choice = cp.mode_for(plan.layout(cp.local_sizes), heads, padded=padded)
    result["mode"] = choice.mode
    result["reason"] = choice.reason
    result["heads_bytes"] = sum(v for k, v in cp.traffic.items() if k.startswith("heads"))
    result["other_bytes"] = sum(v for k, v in cp.traffic.items() if not k.startswith("heads"))
    # batch 2, float64, rows of the model width
    result["predicted_heads_bytes"] = head_parallel_rows(cp.placement)[cp.rank] * hidden * 2 * 8
    result["schedule_rows"] = list(choice.schedule_rows)
    result["head_rows"] = list(choice.head_rows)
    return result


# -------------------------------------------------------------------- cases


def case_documents(world: int) -> dict[str, Any]:
    """Many packed causal documents (long-tailed, some split), RoPE on global positions."""
    return _run("groups doc*\ndoc* -> self [causal]", LONG_TAILED, 12, {"mode": "heads"}, rope=True)


def case_documents_auto(world: int) -> dict[str, Any]:
    """The same under ``mode="auto"``: whole documents move little, so the schedule runs."""
    return _run("groups doc*\ndoc* -> self [causal]", LONG_TAILED, 12, {"mode": "auto"}, rope=True)


def case_vlm(world: int) -> dict[str, Any]:
    """Registers and image bidirectional, text causal over everything."""
    return _run(VLM, VLM_SIZES, 12, {"mode": "heads"})


def case_anchors(world: int) -> dict[str, Any]:
    """AB-UPT joint anchor attention, 6 heads on 2 and 3 ranks (12 on 4)."""
    return _run(ABUPT_JOINT, ABUPT, _heads_for(world), {"mode": "heads"})


def case_joint_auto(world: int) -> dict[str, Any]:
    """Everything attends to everything under ``mode="auto"``: a ring passes
    2 (R - 1) / R of the tokens' rows, the all-to-alls 4 (R - 1) / R**2."""
    sizes = {"a": 12, "b": 16}  # even shards at 2 ranks: the two modes tie
    return _run("groups a b\n* -> *", sizes, 12, {"mode": "auto"})


def case_grouped_query(world: int) -> dict[str, Any]:
    """12 query heads sharing 3 K/V heads (more ranks than K/V heads at 4)."""
    return _run(VLM, VLM_SIZES, 12, {"mode": "heads"}, kv_heads=3)


def case_padding(world: int) -> dict[str, Any]:
    """A key padding mask travels with the keys through the all-to-all."""
    return _run(VLM, VLM_SIZES, 12, {"mode": "heads"}, padded=True)


def case_device_mesh(world: int) -> dict[str, Any]:
    """The group given as a one-dimensional DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    return _run(VLM, VLM_SIZES, 12, {"mode": "heads", "group": mesh})


def _mesh_2d(world: int) -> Any:
    """``(groups, ranks per group)``: two ranks per group where they divide, else one group."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (world // 2, 2) if world % 2 == 0 else (1, world)
    return init_device_mesh("cpu", shape, mesh_dim_names=("ring", "heads"))


def _run_hybrid(
    source: str, sizes: dict[str, int], rope: bool = False, padded: bool = False
) -> dict[str, Any]:
    """``compare`` on a two-dimensional mesh (the hybrid mode), with the bytes
    each level moved and the heads one rank's group held."""
    module, forward, plan, hidden = _module(source, sizes, 12, rope=rope)
    padding = None
    if padded:
        padding = torch.rand(2, sum(sizes.values()), generator=torch.Generator().manual_seed(5)) > 0.3
    mesh = _mesh_2d(dist.get_world_size())
    options = {"group": mesh, "mode": "hybrid"}
    result = compare(module, forward, plan, sizes, options, padding=padding, dim=hidden)
    x_full = torch.randn(2, sum(sizes.values()), hidden, dtype=torch.float64)
    # the hybrid, then the schedule alone over the mesh's first dimension (every head)
    cp = ContextParallel(plan, sizes, **options)
    schedule_only = ContextParallel(plan, sizes, mesh.get_group(0), mode="ring")
    for run in (cp, schedule_only):
        x = run.shard(x_full)
        with torch.no_grad(), run:
            if padding is None:
                forward(x, run.local_sizes)
            else:
                forward(x, {"sizes": run.local_sizes, "padding": run.shard(padding)})
    result["heads_bytes"] = sum(v for k, v in cp.traffic.items() if k.startswith("heads"))
    result["other_bytes"] = sum(v for k, v in cp.traffic.items() if not k.startswith("heads"))
    result["schedule_bytes"] = sum(schedule_only.traffic.values())
    result["tokens"] = [cp.placement.tokens(r) for r in range(cp.world_size)]
    result["mesh"] = list(mesh.mesh.shape)
    result["mode"] = cp.mode
    groups, per_group = mesh.mesh.shape
    calls = [c.attention for c in plan.layout(sizes).calls]
    within, _ = hybrid_rows(list(sizes), calls, sizes, groups * per_group, per_group)
    row_bytes = 2 * hidden * 8  # batch 2, float64, rows of the model width
    result["predicted_within"] = within[cp.rank // per_group] * row_bytes
    result["row_bytes"] = row_bytes
    return result


def case_hybrid_documents(world: int) -> dict[str, Any]:
    """Long-tailed causal documents on a 2-D mesh, RoPE on global positions."""
    return _run_hybrid("groups doc*\ndoc* -> self [causal]", LONG_TAILED, rope=True)


def case_hybrid_vlm_padded(world: int) -> dict[str, Any]:
    """The VLM mask with key padding: the padding channel crosses both levels."""
    return _run_hybrid(VLM, VLM_SIZES, padded=True)


def case_hybrid_joint(world: int) -> dict[str, Any]:
    """AB-UPT joint anchors: gathered between groups, heads within them."""
    return _run_hybrid(ABUPT_JOINT, distributed_cases.ABUPT)


def case_empty_ranks(world: int) -> dict[str, Any]:
    """Two tokens: from 3 ranks on, some ranks hold none and still join both all-to-alls."""
    sizes = {"anchors": 1, "queries": 1}
    return _run("groups anchors queries\n* -> anchors", sizes, 12, {"mode": "heads"})


def case_alibi_transformer(world: int) -> dict[str, Any]:
    """A Transformer stack with ALiBi (slopes sliced to each rank's heads), documents and anchors."""
    source = "groups doc* anchors queries\ndoc* -> self [causal]\nanchors, queries -> anchors, queries"
    sizes = {"doc0": 9, "doc1": 23, "anchors": 5, "queries": 17}
    config = patternc.nn.TransformerConfig(
        vocab_size=None,
        d_model=24,
        num_heads=12,
        num_layers=2,
        d_ff=32,
        dropout_rate=0.0,
        pos_emb_type="alibi",
    )
    torch.manual_seed(0)
    model = patternc.nn.Transformer(config, patternc.compile(source)).double()
    plan = next(iter(model.plans.values())).bind(list(sizes))
    result = compare(model, lambda x, s: model(x, s), plan, sizes, {"mode": "heads"}, dim=24)
    cp = ContextParallel(plan, sizes, mode="heads")
    result["mode"] = cp.mode_for(plan.layout(cp.local_sizes), 12, alibi=True).mode
    return result


def _anchors_then_queries() -> tuple[Any, Tensor, Tensor, Callable[..., tuple[Tensor, Any]]]:
    """11 anchors and 20 queries reading them (12 heads): the plan, the
    inputs, and a call of the module with a KV cache (decoding's order:
    anchors first, their cache read by the queries)."""
    attn, _, plan, hidden = _module(
        "groups anchors queries\n* -> anchors", {"anchors": 11, "queries": 20}, 12
    )
    torch.manual_seed(3)
    anchors = torch.randn(2, 11, hidden, dtype=torch.float64)
    queries = torch.randn(2, 20, hidden, dtype=torch.float64)

    def run(x: Tensor, sizes: dict[str, Any], cache: Any = None) -> tuple[Tensor, Any]:
        specs = [TokenSpec(name=g, size=n) for g, n in sizes.items()]
        out: tuple[Tensor, Any] = attn(x, specs, plan, kv_cache=cache)
        return out

    return plan, anchors, queries, run


def case_kv_cache(world: int) -> dict[str, Any]:
    """Anchors computed head-parallel with ``full_kv_cache=True`` (every rank
    ends with every head of them), then head-parallel queries read that
    cache (each rank its heads of it)."""
    plan, anchors, queries, run = _anchors_then_queries()
    _, ref_cache = run(anchors, {"anchors": 11, "queries": 0})
    ref, _ = run(queries, {"anchors": None, "queries": 20}, ref_cache)
    cp = ContextParallel(plan, {"anchors": 11, "queries": 0}, full_kv_cache=True, mode="heads")
    with cp:
        _, cache = run(cp.shard(anchors), cp.local_sizes)
    cp_queries = ContextParallel(plan, {"anchors": None, "queries": 20}, mode="heads")
    with cp_queries:
        out, _ = run(cp_queries.shard(queries), cp_queries.local_sizes, cache)
    layout = plan.layout(cp_queries.local_sizes)
    return {
        "cache": max(
            float((cache["anchors"][k] - ref_cache["anchors"][k]).norm() / ref_cache["anchors"][k].norm())
            for k in "kv"
        ),
        "out": _error(out - cp_queries.shard(ref), cp_queries.shard(ref)),
        "mode": cp_queries.mode_for(layout, 12).mode,
        "heads_bytes": sum(v for k, v in cp_queries.traffic.items() if k.startswith("heads")),
    }


def case_full_cache_of_whole_documents(world: int) -> dict[str, Any]:
    """``full_kv_cache=True`` in head-parallel mode where ranks hold different
    documents whole: every rank ends with every document's keys/values."""
    attn, _, plan, hidden = _module("groups doc*\ndoc* -> self [causal]", LONG_TAILED, 12)
    torch.manual_seed(3)
    x = torch.randn(2, sum(LONG_TAILED.values()), hidden, dtype=torch.float64)
    specs = [TokenSpec(name=g, size=n) for g, n in LONG_TAILED.items()]
    ref, ref_cache = attn(x, specs, plan)
    cp = ContextParallel(plan, LONG_TAILED, full_kv_cache=True, mode="heads")
    local_specs = [TokenSpec(name=g, size=n) for g, n in cp.local_sizes.items()]
    with torch.no_grad(), cp:
        out, cache = attn(cp.shard(x), local_specs, plan)
    assert cache is not None and ref_cache is not None
    own = ContextParallel(plan, LONG_TAILED, mode="heads")  # without: the documents this rank holds whole
    with torch.no_grad(), own:
        _, own_cache = attn(own.shard(x), local_specs, plan)
    assert own_cache is not None
    whole = sorted(g.name for g in own.placement.groups if g.size and g.local_size(own.rank) == g.size)
    return {
        "cache": max(
            float((c[g][k] - ref_cache[g][k]).norm() / ref_cache[g][k].norm())
            for c in (cache, own_cache)
            for g in c
            for k in "kv"
        ),
        "out": _error(out - cp.shard(ref), cp.shard(ref)),
        "all_groups": sorted(cache) == sorted(LONG_TAILED),
        "own_groups": sorted(own_cache) == whole,
    }


def _error(local_diff: Tensor, local_ref: Tensor) -> float:
    """Relative error over every rank's tokens."""
    sums = torch.stack([local_diff.square().sum(), local_ref.square().sum()])
    dist.all_reduce(sums)
    return float((sums[0] / sums[1].clamp_min(1e-300)).sqrt())


def case_refused(world: int) -> dict[str, Any]:
    """Errors: heads that do not divide (forced, and auto's fallback), an unknown mode."""
    heads = world + 1  # never a multiple of the ranks
    _, forward, plan, hidden = _module(VLM, VLM_SIZES, heads)
    out: dict[str, Any] = {}
    cp = ContextParallel(plan, VLM_SIZES, mode="heads")
    x = cp.shard(torch.randn(2, sum(VLM_SIZES.values()), hidden, dtype=torch.float64))
    try:
        with torch.no_grad(), cp:
            forward(x, cp.local_sizes)
        out["forced"] = ""
    except ValueError as error:
        out["forced"] = str(error)
    auto = ContextParallel(plan, VLM_SIZES, mode="auto")
    out["auto"] = auto.mode_for(plan.layout(auto.local_sizes), heads).reason
    try:
        ContextParallel(plan, VLM_SIZES, mode="ulysses")  # type: ignore[arg-type]
        out["unknown"] = ""
    except ValueError as error:
        out["unknown"] = str(error)
    other = patternc.compile("groups registers image text\n* -> *").patterns["default"]
    out["other_plan"] = auto.mode_for(other.layout(auto.local_sizes), 12).reason
    return out


def case_hybrid_kv_cache(world: int) -> dict[str, Any]:
    """Queries on a 2-D mesh reading anchors from a KV cache (every head on
    every rank; each rank of a group reads its heads of it)."""
    plan, anchors, queries, run = _anchors_then_queries()
    _, cache = run(anchors, {"anchors": 11, "queries": 0})
    ref, _ = run(queries, {"anchors": None, "queries": 20}, cache)
    cp = ContextParallel(plan, {"anchors": None, "queries": 20}, _mesh_2d(world), mode="hybrid")
    with cp:
        out, _ = run(cp.shard(queries), cp.local_sizes, cache)
    return {"out": _error(out - cp.shard(ref), cp.shard(ref))}


def _run_in(cp: ContextParallel, forward: Forward, x: Tensor) -> None:
    with cp:
        forward(x, cp.local_sizes)


def case_hybrid_refused(world: int) -> dict[str, Any]:
    """The hybrid mode's errors: heads that do not divide over a group's
    ranks, mode='hybrid' without a 2-D mesh, a 2-D mesh without
    mode='hybrid' (a ("dp", "cp") mesh passed whole is refused, not run as
    one batch), a mesh whose ranks are not in rank order, and full caches."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    mesh = _mesh_2d(world)
    per_group = mesh.size(1)
    heads = per_group + 1  # never a multiple of the group's ranks
    _, forward, plan, hidden = _module(VLM, VLM_SIZES, heads)
    out: dict[str, Any] = {}
    cp = ContextParallel(plan, VLM_SIZES, mesh, mode="hybrid")
    x = cp.shard(torch.randn(2, sum(VLM_SIZES.values()), hidden, dtype=torch.float64))
    cube = init_device_mesh("cpu", (1, 1, world))
    backwards = DeviceMesh("cpu", torch.arange(world).flip(0).view(1, world))
    _, forward_12, _, hidden_12 = _module(VLM, VLM_SIZES, 12)
    full = ContextParallel(plan, VLM_SIZES, mesh, mode="hybrid", full_kv_cache=True)
    x_12 = full.shard(torch.randn(2, sum(VLM_SIZES.values()), hidden_12, dtype=torch.float64))
    for label, attempt in (
        ("heads", lambda: forward(x, cp.local_sizes)),
        ("one_dim", lambda: ContextParallel(plan, VLM_SIZES, mode="hybrid")),
        ("three_dims", lambda: ContextParallel(plan, VLM_SIZES, cube, mode="hybrid")),
        ("unasked", lambda: ContextParallel(plan, VLM_SIZES, mesh)),
        ("rank_order", lambda: ContextParallel(plan, VLM_SIZES, backwards, mode="hybrid")),
        ("full_cache", lambda: _run_in(full, forward_12, x_12)),
    ):
        try:
            with torch.no_grad(), cp:
                attempt()
            out[label] = ""
        except ValueError as error:
            out[label] = str(error)
    return out


CASES: dict[str, Callable[[int], dict[str, Any]]] = {
    name[5:]: fn for name, fn in globals().items() if name.startswith("case_")
}


TIMEOUT_SECONDS = 60


def spawn(world: int, names: list[str], out_dir: str, port: int) -> list[dict[str, Any]]:
    """Run ``names`` on ``world`` gloo processes (distributed_cases' worker,
    reading this module's cases); every rank's results."""
    return distributed_cases.spawn(world, names, out_dir, port, module="heads_cases")
