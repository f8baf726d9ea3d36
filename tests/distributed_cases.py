"""Context-parallel cases, run on every rank of a gloo group spawned by tests/test_distributed.py.

Each case builds the same module on every rank (same seed), runs it once on
one process over all tokens (the reference) and once sharded, and returns
``{metric: relative error}`` computed over the whole output (squared errors
all-reduced), plus anything the test asserts on (bytes, strategies).
Inputs are float64.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import patternc
from patternc import MixedAttentionConfig, TokenSpec
from patternc.distributed import ContextParallel, DistributedError
from patternc.distributed.loss import GradReduction
from patternc.nn import PatternAttention, chunked, rope_frequencies

Forward = Callable[[Tensor, dict[str, Any]], Tensor]

ABUPT = {"surface_anchors": 6, "surface_queries": 13, "volume_anchors": 3, "volume_queries": 9}
DOCUMENTS = {f"doc{i}": n for i, n in enumerate([5, 9, 1, 12, 3, 7, 2, 11, 4, 6, 8, 1, 10, 3, 5, 2, 9])}
LONG_TAILED = {f"doc{i}": n for i, n in enumerate([41, 3, 26, 2, 7, 1, 12, 5, 30, 2, 4, 9])}
"""At 3 and 4 ranks the balance splits the large documents over two neighbouring ranks, unevenly."""
UNEQUAL_BRANCHES = {"surface_anchors": 3, "surface_queries": 10, "volume_anchors": 6, "volume_queries": 37}


def _specs(sizes: dict[str, Any]) -> list[TokenSpec]:
    return [TokenSpec(name=n, size=s) for n, s in sizes.items()]


def _global_error(local_diff: Tensor, local_ref: Tensor) -> float:
    sums = torch.stack([local_diff.square().sum(), local_ref.square().sum()])
    dist.all_reduce(sums)
    return float((sums[0] / sums[1].clamp_min(1e-300)).sqrt())


def small_stack(
    program: patternc.Program, pos_emb: str, num_layers: int = 2, untied: bool = False
) -> patternc.nn.Transformer:
    """A float64 Transformer stack over ``program``: width 16, two heads,
    ``d_ff`` 32, no vocabulary, no dropout; its weights come from the
    caller's seed."""
    config = patternc.nn.TransformerConfig(
        vocab_size=None,
        d_model=16,
        num_heads=2,
        num_layers=num_layers,
        d_ff=32,
        dropout_rate=0.0,
        pos_emb_type=pos_emb,
        untied=untied,
    )
    return patternc.nn.Transformer(config, program).double()


def compare(
    module: nn.Module,
    forward: Forward,
    plan: Any,
    sizes: dict[str, int],
    cp_options: dict[str, Any] | None = None,
    padding: Tensor | None = None,
    dim: int = 16,
    tokens: Tensor | None = None,
    reduce_group: Any = None,
) -> dict[str, Any]:
    """Output, input gradient and parameter gradients: sharded against one
    process. ``reduce_group``: the ranks whose parameter gradients add up to
    one process's (those of the ContextParallel's group)."""
    n = sum(sizes.values())
    torch.manual_seed(1)
    x = tokens if tokens is not None else torch.randn(2, n, dim, dtype=torch.float64)
    probe = torch.randn(2, n, dim, dtype=torch.float64)
    floating = x.is_floating_point()
    x_ref = x.clone().requires_grad_(floating)
    module.zero_grad()
    ref = (
        forward(x_ref, dict(sizes))
        if padding is None
        else forward(x_ref, {"sizes": sizes, "padding": padding})
    )
    (ref * probe[..., : ref.shape[-1]]).sum().backward()
    ref_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    module.zero_grad()
    # these cases cover the schedule (local, gather, ring); tests/heads_cases.py the head-parallel mode
    cp = ContextParallel(plan, sizes, **{"mode": "ring", **(cp_options or {})})
    x_local = cp.shard(x).requires_grad_(floating)
    with cp:
        if padding is None:
            out = forward(x_local, cp.local_sizes)
        else:
            out = forward(x_local, {"sizes": cp.local_sizes, "padding": cp.shard(padding)})
    (out * cp.shard(probe)[..., : out.shape[-1]]).sum().backward()
    result: dict[str, Any] = {"out": _global_error(out - cp.shard(ref), cp.shard(ref))}
    with torch.no_grad():  # every rank's tokens back in input order
        result["unshard"] = float((cp.unshard(out) - ref).norm() / ref.norm())
    if floating:
        assert x_ref.grad is not None and x_local.grad is not None
        result["grad_x"] = _global_error(x_local.grad - cp.shard(x_ref.grad), cp.shard(x_ref.grad))
    worst = 0.0
    for p, expected in zip(module.parameters(), ref_grads):
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=reduce_group)
        if expected.norm() > 0:
            worst = max(worst, float((grad - expected).norm() / expected.norm()))
    result["grad_params"] = worst
    layout = plan.layout(cp.local_sizes)
    schedule = cp.schedule_for(layout, padded=padding is not None)
    if schedule.placement.world_size != cp.world_size:  # a 2-D mesh: the schedule is its groups'
        return result
    result["strategies"] = [c.strategy for c in schedule.calls]
    result["received"] = schedule.received[cp.rank]
    result["minimum"] = schedule.minimum[cp.rank]
    result["kinds"] = sorted({g.kind for g in cp.placement.groups})
    result["holders"] = [sum(1 for r in g.ranges if r) for g in cp.placement.groups]
    result["shards"] = [[g.local_size(r) for r in range(cp.world_size)] for g in cp.placement.groups]
    return result


def rope_at_global_positions(x: Tensor, sizes: dict[str, Any], head_dim: int) -> Tensor:
    """RoPE frequencies of the tokens ``x`` holds: each one's position within
    its group, from the sharding in force (global, not local), else in order."""
    sharding = patternc.nn.context.ACTIVE.sharding
    positions = (
        sharding.local_positions(x.device)
        if sharding is not None
        else torch.cat([torch.arange(n) for n in sizes.values() if n])
    )
    return rope_frequencies(positions, head_dim)


def _record_both_passes(
    cp: ContextParallel, forward: Forward, x: Tensor, events: list[str], result: dict[str, Any]
) -> None:
    """One forward and backward under ``cp``, the events each pass recorded
    (by the spies a case installs) into ``result``."""
    with cp:
        out = forward(x, cp.local_sizes)
    result["forward_events"] = list(events)
    events.clear()
    out.square().sum().backward()
    result["backward_events"] = list(events)


def _attention(source: str, sizes: dict[str, int], rope: bool = False) -> tuple[nn.Module, Forward, Any]:
    plan = patternc.compile(source).patterns["default"]
    torch.manual_seed(0)
    config = MixedAttentionConfig(hidden_dim=16, num_heads=2, use_rope=rope)
    attn = PatternAttention(config, plan).double()

    def forward(x: Tensor, sizes: dict[str, Any]) -> Tensor:
        freqs = rope_at_global_positions(x, sizes, 8) if rope else None
        return attn(x, sizes, freqs=freqs)[0]

    return attn, forward, plan


def _anchor_module(kind: str) -> tuple[nn.Module, Forward, Any]:
    cls = {
        "self": patternc.nn.SelfAnchorAttention,
        "cross": patternc.nn.CrossAnchorAttention,
        "joint": patternc.nn.JointAnchorAttention,
    }[kind]
    config_cls = {
        "self": patternc.configs.SelfAnchorAttentionConfig,
        "cross": patternc.configs.CrossAnchorAttentionConfig,
        "joint": patternc.configs.JointAnchorAttentionConfig,
    }[kind]
    torch.manual_seed(0)
    module = cls(config_cls(hidden_dim=16, num_heads=2, branches=["surface", "volume"])).double()
    plan = module.plan(_specs(ABUPT))
    return module, lambda x, sizes: module(x, _specs(sizes)), plan


# -------------------------------------------------------------------- cases


def case_self_anchor(world: int) -> dict[str, Any]:
    return compare(*_anchor_module("self"), ABUPT)


def case_cross_anchor(world: int) -> dict[str, Any]:
    return compare(*_anchor_module("cross"), ABUPT)


def case_joint_anchor(world: int) -> dict[str, Any]:
    """Local work on the auto backend instead of the module's own."""
    return compare(*_anchor_module("joint"), ABUPT, {"backend": "auto"})


def case_joint_ring(world: int) -> dict[str, Any]:
    """Everything attends to everything: the keys go around the ring."""
    return compare(*_attention("groups a b\n* -> *", {"a": 9, "b": 14}), {"a": 9, "b": 14})


def case_documents(world: int) -> dict[str, Any]:
    """17 causal documents of uneven sizes, each whole on a rank (a loose
    balance keeps them whole), RoPE on global positions."""
    module, forward, plan = _attention("groups doc*\ndoc* -> self [causal]", DOCUMENTS, rope=True)
    return compare(module, forward, plan, DOCUMENTS, {"balance": 2.0})


def case_documents_balanced(world: int) -> dict[str, Any]:
    """Long-tailed causal documents under the default balance: large ones
    split over the neighbouring ranks that share them, in uneven zigzag
    shards; RoPE on global positions."""
    module, forward, plan = _attention("groups doc*\ndoc* -> self [causal]", LONG_TAILED, rope=True)
    return compare(module, forward, plan.bind(list(LONG_TAILED)), LONG_TAILED)


def case_windowed_documents_balanced(world: int) -> dict[str, Any]:
    """The same documents under a causal window: band masks on uneven zigzag shards."""
    source = "groups doc*\ndoc* -> self [causal, window 6]"
    module, forward, plan = _attention(source, LONG_TAILED)
    return compare(module, forward, plan.bind(list(LONG_TAILED)), LONG_TAILED)


def case_unequal_branches(world: int) -> dict[str, Any]:
    """AB-UPT self-anchor attention with a small and a large branch: both
    split in uneven shards (a rank may hold queries of a branch and none of
    its anchors)."""
    source = (
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_* -> surface_anchors\nvolume_* -> volume_anchors"
    )
    return compare(*_attention(source, UNEQUAL_BRANCHES), UNEQUAL_BRANCHES)


def case_device_mesh(world: int) -> dict[str, Any]:
    """The group given as a one-dimensional DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    module, forward, plan = _attention("groups doc*\ndoc* -> self [causal]", LONG_TAILED, rope=True)
    return compare(module, forward, plan.bind(list(LONG_TAILED)), LONG_TAILED, {"group": mesh})


def case_device_mesh_2d(world: int) -> dict[str, Any]:
    """A ``("dp", "cp")`` mesh (4 ranks): each data-parallel row shards the
    same batch over its ``mesh["cp"]``; the whole mesh is refused with a fix."""
    from torch.distributed.device_mesh import init_device_mesh

    if world != 4:
        return {"skipped": True}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    sizes = {"a": 9, "b": 14}  # everything attends to everything: a ring within each row
    module, forward, plan = _attention("groups a b\n* -> *", sizes)
    try:
        ContextParallel(plan, sizes, mesh)
        refused = ""
    except ValueError as error:
        refused = str(error)
    cp_group = mesh["cp"].get_group()
    result = compare(module, forward, plan, sizes, {"group": mesh["cp"]}, reduce_group=cp_group)
    result["refused"] = refused
    result["cp_rank"] = dist.get_rank(cp_group)
    return result


def case_small_group(world: int) -> dict[str, Any]:
    """One anchor (fewer tokens than ranks), three queries: empty shards."""
    sizes = {"anchors": 1, "queries": 3}
    return compare(*_attention("groups anchors queries\n* -> anchors", sizes), sizes)


def case_causal_spanning(world: int) -> dict[str, Any]:
    """A long causal document (zigzag over every rank) beside short ones, and a window."""
    sizes = {"doc0": 3, "doc1": 61, "doc2": 4, "doc3": 2}
    return compare(*_attention("groups doc*\ndoc* -> self [causal, window 9]", sizes), sizes)


def case_per_key_modifiers(world: int) -> dict[str, Any]:
    sizes = {"image": 7, "text": 19}
    source = "groups image text\nimage -> image\ntext -> image, text[causal]"
    return compare(*_attention(source, sizes), sizes, {"strategy": "gather"})


def case_block_causal_frames(world: int) -> dict[str, Any]:
    """Frames reading every earlier frame (a member relation), RoPE on global positions."""
    sizes = {"prompt": 5, **{f"frame{i}": n for i, n in enumerate([9, 4, 13, 7, 6])}}
    source = "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"
    module, forward, plan = _attention(source, sizes, rope=True)
    return compare(module, forward, plan, sizes)


def case_prefixed_documents(world: int) -> dict[str, Any]:
    """Documents of a prefix and a text each (parts, `same`, `self` beside a key)."""
    sizes = {"doc0.prefix": 4, "doc0.text": 11, "doc1.text": 6, "doc2.prefix": 3, "doc2.text": 17}
    source = "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]"
    return compare(*_attention(source, sizes), sizes)


def case_window_across_a_global_token(world: int) -> dict[str, Any]:
    """A causal window counted in input order across a global token placed mid-sequence."""
    sizes = {"left": 13, "sink": 2, "right": 17}
    source = "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 6, across]"
    return compare(*_attention(source, sizes), sizes)


def case_image_neighbourhood(world: int) -> dict[str, Any]:
    """NATTEN over a 7 x 9 image split over the ranks (coordinates from
    positions within the whole group, wherever its tokens sit), beside a caption."""
    sizes = {"caption": 5, "image": 63}
    source = "groups caption image[7, 9]\ncaption -> *\nimage -> caption, image[kernel 3 5]"
    return compare(*_attention(source, sizes), sizes)


def case_video_neighbourhood_ring(world: int) -> dict[str, Any]:
    """A 3 x 5 x 6 video on a ring: blocks out of a rank's reach are not read."""
    sizes = {"video": 90}
    source = "groups video[3, 5, 6]\nvideo -> video[kernel 3 3 3]"
    return compare(*_attention(source, sizes, rope=True), sizes, {"strategy": "ring"})


def case_ring_window(world: int) -> dict[str, Any]:
    """A causal window of 8 over 64 tokens (zigzag: rank ``r`` holds chunks
    ``r`` and ``2R-1-r`` of 8 tokens): a rank computes only the blocks that
    hold its chunks' predecessors, the others pass through uncomputed."""
    from patternc.distributed.blockwise import BlockKernel

    sizes = {"a": 64}
    calls = {"forward": 0}
    original = BlockKernel.attend

    def counted(self: BlockKernel, *args: Any, **kwargs: Any) -> Any:
        calls["forward"] += 1
        return original(self, *args, **kwargs)

    BlockKernel.attend = counted  # type: ignore[method-assign]  # a spy: blocks computed
    try:
        module, forward, plan = _attention("groups a\na -> a [causal, window 8]", sizes)
        result = compare(module, forward, plan, sizes, {"strategy": "ring"})
        cp = ContextParallel(plan, sizes, strategy="ring")
        calls["forward"] = 0
        x = cp.shard(torch.randn(2, 64, 16, dtype=torch.float64))
        with torch.no_grad(), cp:
            forward(x, cp.local_sizes)
    finally:
        BlockKernel.attend = original  # type: ignore[method-assign]
    result["computed"] = calls["forward"]
    result["ring_bytes"] = sum(v for k, v in cp.traffic.items() if k.startswith("ring"))
    held = sum(stop - start for start, stop in cp.local_ranges)  # this rank's tokens (zigzag: two chunks)
    result["block_bytes"] = 2 * held * 2 * 16 * 8  # batch 2, K and V of 16 channels, float64
    return result


def case_ring_overlap(world: int) -> dict[str, Any]:
    """Full attention of 45 tokens on a ring of every rank, with spies on the
    kernel and on the P2P calls: the order in which one forward and one
    backward post exchanges (tag 0 blocks, 1 gradients), wait on them and
    compute. Also the sharded result against one process."""
    from patternc.distributed import calls as calls_module
    from patternc.distributed.blockwise import BlockKernel

    sizes = {"a": 45}
    module, forward, plan = _attention("groups a\na -> a", sizes)
    result = compare(module, forward, plan, sizes, {"strategy": "ring"})
    events: list[str] = []
    post, kernel_forward, block_backward = (
        calls_module.post_exchange,
        BlockKernel.attend,
        calls_module._block_backward,
    )

    class Spied:
        def __init__(self, pending: Any, tag: int) -> None:
            self.pending, self.tag, self.received = pending, tag, pending.received

        def wait(self) -> Tensor:
            events.append(f"wait{self.tag}")
            received: Tensor = self.pending.wait()
            return received

    def posted(send: Tensor, to: int, shape: Any, source: int, group: Any, tag: int = 0) -> Any:
        events.append(f"post{tag}")
        return Spied(post(send, to, shape, source, group, tag), tag)

    def computed_forward(self: BlockKernel, *args: Any) -> Any:
        events.append("compute")
        return kernel_forward(self, *args)

    def computed_backward(*args: Any) -> None:
        events.append("compute")
        block_backward(*args)

    cp = ContextParallel(plan, sizes, strategy="ring")
    x = cp.shard(torch.randn(2, 45, 16, dtype=torch.float64)).requires_grad_(True)
    calls_module.post_exchange = posted  # type: ignore[assignment]
    BlockKernel.attend = computed_forward  # type: ignore[method-assign]
    calls_module._block_backward = computed_backward
    try:
        _record_both_passes(cp, forward, x, events, result)
    finally:
        calls_module.post_exchange = post  # type: ignore[assignment]
        BlockKernel.attend = kernel_forward  # type: ignore[method-assign]
        calls_module._block_backward = block_backward
    result["steps"] = [c.steps for c in cp.schedule_for(plan.layout(cp.local_sizes)).calls]
    return result


def case_gather_overlap(world: int) -> dict[str, Any]:
    """Anchors gathered for one call while another call's ring computes, with
    spies on the gather's posts and waits and on the kernels: the forward
    posts the all-gather before the ring's blocks compute and waits for it
    only before the executor's call that reads it; the backward posts the
    reduce-scatter before the ring's backward computes and waits for it
    after. Also the sharded result against one process."""
    from patternc.distributed import calls as calls_module
    from patternc.distributed import collectives
    from patternc.distributed.blockwise import BlockKernel

    sizes = {"anchors": 6, "queries": 30, "text": 40}
    source = "groups anchors queries text\nanchors, queries -> anchors\ntext -> text"
    module, forward, plan = _attention(source, sizes)
    options = {"whole_groups": False}
    result = compare(module, forward, plan, sizes, options)
    events: list[str] = []
    state = collectives._GatherState
    spied = {
        "post_gather": "gather",
        "wait_gather": "gathered",
        "post_reduce": "reduce",
        "wait_reduce": "reduced",
    }
    originals = {name: getattr(state, name) for name in spied}
    kernel_forward, block_backward, executor_run = (
        BlockKernel.attend,
        calls_module._block_backward,
        calls_module.ExecutorCalls.run,
    )

    def spy(name: str, label: str) -> Any:
        def run(self: Any, *args: Any) -> Any:
            events.append(label)
            return originals[name](self, *args)

        return run

    def ring_forward(self: BlockKernel, *args: Any) -> Any:
        events.append("ring")
        return kernel_forward(self, *args)

    def ring_backward(*args: Any) -> None:
        events.append("ring")
        block_backward(*args)

    def executor(self: Any, *args: Any) -> Any:
        events.append("executor")
        return executor_run(self, *args)

    cp = ContextParallel(plan, sizes, **options)
    strategies = {c.attention.text(): c.strategy for c in cp.schedule_for(plan.layout(cp.local_sizes)).calls}
    x = cp.shard(torch.randn(2, sum(sizes.values()), 16, dtype=torch.float64)).requires_grad_(True)
    for name, label in spied.items():
        setattr(state, name, spy(name, label))
    BlockKernel.attend = ring_forward  # type: ignore[method-assign]
    calls_module._block_backward = ring_backward
    calls_module.ExecutorCalls.run = executor  # type: ignore[method-assign]
    try:
        _record_both_passes(cp, forward, x, events, result)
    finally:
        for name, original in originals.items():
            setattr(state, name, original)
        BlockKernel.attend = kernel_forward  # type: ignore[method-assign]
        calls_module._block_backward = block_backward
        calls_module.ExecutorCalls.run = executor_run  # type: ignore[method-assign]
    result["strategies"] = strategies
    return result


SUB_RING = {
    "doc0": 20,
    **{f"doc{i}": n for i, n in enumerate([9, 11, 7, 10, 8, 12, 9, 7, 11, 9, 10, 8, 9], 1)},
}
"""At 4 ranks doc0 and doc5 are split over ranks 0 and 1, doc6 over ranks 2 and 3, the rest whole."""


def case_sub_ring(world: int) -> dict[str, Any]:
    """Each split document's ring (forced: by default a halo, which moves
    less) runs over the ranks that hold it: every exchange (forward and
    backward) is recorded with its peers and bytes, and one more forward
    counts ``cp.traffic`` per call against the schedule."""
    from patternc.distributed import calls as calls_module

    exchanges: list[tuple[int, int, int, int]] = []
    original = calls_module.post_exchange

    def recorded(send: Tensor, to: int, shape: Any, source: int, group: Any, tag: int = 0) -> Any:
        pending = original(send, to, shape, source, group, tag)
        sent = send.numel() * send.element_size()
        got = pending.received.numel() * pending.received.element_size()
        exchanges.append((to % world, source % world, sent, got))
        return pending

    calls_module.post_exchange = recorded  # type: ignore[assignment]  # a spy: who talks to whom
    try:
        module, forward, plan = _attention("groups doc*\ndoc* -> self [causal]", SUB_RING, rope=True)
        plan = plan.bind(list(SUB_RING))
        result = compare(module, forward, plan, SUB_RING, {"strategy": "ring"})
    finally:
        calls_module.post_exchange = original  # type: ignore[assignment]
    cp = ContextParallel(plan, SUB_RING, strategy="ring")
    with torch.no_grad(), cp:
        forward(cp.shard(torch.randn(2, sum(SUB_RING.values()), 16, dtype=torch.float64)), cp.local_sizes)
    schedule = cp.schedule_for(plan.layout(cp.local_sizes))
    per_token = 2 * 2 * 16 * 8  # batch 2, K and V of 16 channels, float64
    result["rings"] = [[c.attention.text(), list(c.ranks)] for c in schedule.calls if c.strategy == "ring"]
    result["peers"] = sorted({p for to, source, sent, got in exchanges for p in (to, source) if sent or got})
    result["sent"] = sum(e[2] for e in exchanges)
    result["traffic"] = {k: v for k, v in cp.traffic.items() if v}
    result["scheduled"] = {
        f"ring {c.attention.text()}": schedule.call_received(c, cp.rank) * per_token
        for c in schedule.calls
        if c.strategy == "ring" and schedule.call_received(c, cp.rank)
    }
    return result


HALO = {
    "halo_window": ("groups a\na -> a [causal, window 8]", {"a": 61}),
    "halo_window_global": (
        "groups sink text\nsink -> *\ntext -> sink, text[causal, window 6]",
        {"sink": 3, "text": 53},
    ),
    "halo_across": (
        "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 6, across]",
        {"left": 23, "sink": 2, "right": 29},
    ),
    "halo_long_band": ("groups a\na -> a [back 30, ahead 2]", {"a": 50}),
}
"""Layouts whose calls read their keys in part: windows, global tokens, a band across a global
token, a band longer than a shard (read from several ranks back and one ahead)."""


def _halo_case(name: str) -> dict[str, Any]:
    """The default schedule against one process, then one more forward whose
    key/value bytes arrived (``cp.traffic``, per call) are set beside the
    schedule's tokens received; every post of an exchange is recorded, with
    its peers and bytes, forward and backward."""
    from patternc.distributed import calls as calls_module

    source, sizes = HALO[name]
    exchanges: list[tuple[int, int, int, int]] = []
    original = calls_module.post_exchange
    world = dist.get_world_size()

    def recorded(send: Tensor, to: int, shape: Any, source: int, group: Any, tag: int = 0) -> Any:
        pending = original(send, to, shape, source, group, tag)
        got = pending.received.numel() * pending.received.element_size()
        exchanges.append((to % world, source % world, send.numel() * send.element_size(), got))
        return pending

    module, forward, plan = _attention(source, sizes)
    plan = plan.bind(list(sizes))
    calls_module.post_exchange = recorded  # type: ignore[assignment]  # a spy: who talks to whom
    try:
        result = compare(module, forward, plan, sizes)
        result["step_received"] = sum(e[3] for e in exchanges)  # one forward and backward
        exchanges.clear()
        cp = ContextParallel(plan, sizes, mode="ring")
        with torch.no_grad(), cp:
            forward(cp.shard(torch.randn(2, sum(sizes.values()), 16, dtype=torch.float64)), cp.local_sizes)
    finally:
        calls_module.post_exchange = original  # type: ignore[assignment]
    schedule = cp.schedule_for(plan.layout(cp.local_sizes))
    per_token = 2 * 2 * 16 * 8  # batch 2, K and V of 16 channels, float64
    result["traffic"] = {k: v for k, v in cp.traffic.items() if v}
    result["scheduled"] = {
        f"{c.strategy} {c.attention.text()}": schedule.call_received(c, cp.rank) * per_token
        for c in schedule.calls
        if c.strategy in ("ring", "halo") and schedule.call_received(c, cp.rank)
    }
    result["forward_received"] = sum(e[3] for e in exchanges)
    result["peers"] = sorted(
        {to for to, _, sent, _ in exchanges if sent} | {s for _, s, _, got in exchanges if got}
    )
    return result


def case_halo_window(world: int) -> dict[str, Any]:
    """A causal window of 8 over 61 zigzag tokens: each rank receives the 7
    keys before each of its chunks, from the rank holding them."""
    return _halo_case("halo_window")


def case_halo_window_global(world: int) -> dict[str, Any]:
    """Three global tokens every token reads and that read everything, beside a causal window."""
    return _halo_case("halo_window_global")


def case_halo_across(world: int) -> dict[str, Any]:
    """Longformer-style: a band counted in input order across global tokens mid-sequence."""
    return _halo_case("halo_across")


def case_halo_long_band(world: int) -> dict[str, Any]:
    """A band of 30 back and 2 ahead over 50 tokens in contiguous shards: several ranks back."""
    return _halo_case("halo_long_band")


def case_flex_forward(world: int) -> dict[str, Any]:
    """The ring on FlexAttention's CPU forward (float32, no gradients) against one float64 process."""
    sizes = {"doc0": 5, "doc1": 40}
    source = "groups doc*\ndoc* -> self [causal, window 9]"
    module, forward, plan = _attention(source, sizes)
    torch.manual_seed(3)
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = forward(x, dict(sizes))
        module.float()
        cp = ContextParallel(plan, sizes, kernel="flex", strategy="ring")
        with cp:
            out = forward(cp.shard(x).float(), cp.local_sizes)
    module.double()
    local_ref = cp.shard(ref)
    return {"out": _global_error(out.double() - local_ref, local_ref)}


def case_inputs_read_nothing(world: int) -> dict[str, Any]:
    """Perceiver latents reading inputs that read nothing (their output is zero)."""
    sizes = {"latents": 6, "inputs": 29}
    return compare(*_attention("groups latents inputs\nlatents -> *\ninputs -> nothing", sizes), sizes)


def case_padding(world: int) -> dict[str, Any]:
    module, _, plan = _anchor_module("joint")
    torch.manual_seed(5)
    n = sum(ABUPT.values())
    padding = torch.rand(2, n) > 0.3
    padding[:, 0] = True

    def padded(x: Tensor, args: dict[str, Any]) -> Tensor:
        return module.mixed_attention(x, _specs(args["sizes"]), plan, key_padding_mask=args["padding"])[0]

    return compare(module, padded, plan, ABUPT, padding=padding)


def case_padding_documents(world: int) -> dict[str, Any]:
    """Key padding on documents placed whole (local calls) and on a split one."""
    sizes = {"doc0": 7, "doc1": 40, "doc2": 5, "doc3": 9}
    module, _, plan = _attention("groups doc*\ndoc* -> self [causal]", sizes)
    torch.manual_seed(6)
    padding = torch.rand(2, sum(sizes.values())) > 0.25
    padding[:, [0, 7, 47, 52]] = True  # every document keeps its first key

    def padded(x: Tensor, args: dict[str, Any]) -> Tensor:
        return module(x, args["sizes"], key_padding_mask=args["padding"])[0]

    return compare(module, padded, plan.bind(list(sizes)), sizes, padding=padding)


def case_untied_rope(world: int) -> dict[str, Any]:
    source = (
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_* -> surface_anchors\nvolume_* -> volume_anchors, surface_anchors"
    )
    plan = patternc.compile(source).patterns["default"]
    torch.manual_seed(0)
    config = patternc.configs.UntiedMixedAttentionConfig(
        hidden_dim=16, num_heads=2, num_types=2, use_rope=True
    )
    attn = patternc.nn.UntiedMixedAttention(config, types=["surface", "volume"]).double()
    coordinates = torch.randn(sum(ABUPT.values()), 2, dtype=torch.float64)

    def forward(x: Tensor, sizes: dict[str, Any]) -> Tensor:
        sharding = patternc.nn.context.ACTIVE.sharding
        coords = coordinates if sharding is None else coordinates[sharding.local_index()]
        return attn(x, _specs(sizes), plan, freqs=rope_frequencies(coords, 8))[0]

    return compare(attn, forward, plan, ABUPT)


def case_transformer_alibi(world: int) -> dict[str, Any]:
    """ALiBi (positions within groups) on split groups: the blockwise kernel's bias."""
    source = "groups doc* anchors queries\ndoc* -> self [causal]\nanchors, queries -> anchors, queries"
    sizes = {"doc0": 9, "doc1": 23, "anchors": 5, "queries": 17}
    torch.manual_seed(0)
    model = small_stack(patternc.compile(source), "alibi")
    plan = next(iter(model.plans.values())).bind(list(sizes))
    return compare(model, lambda x, s: model(x, s), plan, sizes)


def case_transformer(world: int) -> dict[str, Any]:
    """A whole untied Transformer stack (RoPE, causal documents and anchors) runs sharded."""
    source = "groups doc* anchors queries\ndoc* -> self [causal]\nanchors, queries -> anchors"
    program = patternc.compile(source)
    sizes = {"doc0": 9, "doc1": 3, "doc2": 14, "anchors": 5, "queries": 40}
    torch.manual_seed(0)
    model = small_stack(program, "rope", untied=True)
    plans = list(model.plans.values())
    return compare(model, lambda x, s: model(x, s), plans[0].bind(list(sizes)), sizes)


def case_kv_cache(world: int) -> dict[str, Any]:
    """Anchors computed sharded (full cache on every rank), then sharded queries read them."""
    attn, _, plan = _attention("groups anchors queries\n* -> anchors", {"anchors": 1, "queries": 1})
    torch.manual_seed(3)
    anchors = torch.randn(2, 11, 16, dtype=torch.float64)
    queries = torch.randn(2, 20, 16, dtype=torch.float64)
    _, ref_cache = attn(anchors, {"anchors": 11, "queries": 0})
    ref, _ = attn(queries, {"anchors": None, "queries": 20}, kv_cache=ref_cache)
    cp = ContextParallel(plan, {"anchors": 11, "queries": 0}, full_kv_cache=True)
    with cp:
        _, cache = attn(cp.shard(anchors), cp.local_sizes)
    assert cache is not None
    cp_queries = ContextParallel(plan, {"anchors": None, "queries": 20})
    with cp_queries:
        out, _ = attn(cp_queries.shard(queries), cp_queries.local_sizes, kv_cache=cache)
    schedule = cp_queries.schedule_for(plan.layout(cp_queries.local_sizes))
    return {
        "cache": max(
            float((cache["anchors"][k] - ref_cache["anchors"][k]).norm() / ref_cache["anchors"][k].norm())
            for k in "kv"
        ),
        "out": _global_error(out - cp_queries.shard(ref), cp_queries.shard(ref)),
        "received": schedule.received[cp_queries.rank],
    }


def case_full_cache_of_whole_documents(world: int) -> dict[str, Any]:
    """``full_kv_cache=True`` where ranks hold different documents whole: every
    rank joins the same all-gathers and ends with every document's keys/values."""
    attn, _, plan = _attention("groups doc*\ndoc* -> self [causal]", LONG_TAILED)
    bound = plan.bind(list(LONG_TAILED))
    torch.manual_seed(3)
    x = torch.randn(2, sum(LONG_TAILED.values()), 16, dtype=torch.float64)
    ref, ref_cache = attn(x, dict(LONG_TAILED))
    cp = ContextParallel(bound, LONG_TAILED, full_kv_cache=True)
    with torch.no_grad(), cp:
        out, cache = attn(cp.shard(x), cp.local_sizes)
    assert cache is not None and ref_cache is not None
    return {
        "cache": max(
            float((cache[g][k] - ref_cache[g][k]).norm() / ref_cache[g][k].norm())
            for g in LONG_TAILED
            for k in "kv"
        ),
        "out": _global_error(out - cp.shard(ref), cp.shard(ref)),
    }


def case_chunked(world: int) -> dict[str, Any]:
    """Chunked inference, anchors sharded, each rank's queries in chunks: equals one shot."""
    _, forward, plan = _attention(
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_anchors -> surface_anchors\nvolume_anchors -> volume_anchors, surface_anchors\n"
        "surface_queries -> surface_anchors\nvolume_queries -> volume_anchors, surface_anchors",
        ABUPT,
    )
    torch.manual_seed(4)
    x = torch.randn(2, sum(ABUPT.values()), 16, dtype=torch.float64)
    with torch.no_grad():
        ref = forward(x, dict(ABUPT))
    queries = ["surface_queries", "volume_queries"]
    context_sizes = {g: (0 if g in queries else n) for g, n in ABUPT.items()}
    cp = ContextParallel(plan, context_sizes)
    rows, local_sizes = _chunked_rows(plan, ABUPT, queries, cp)
    out = chunked(forward, x[:, rows], local_sizes, queries, chunk_size=4, context_parallel=cp)
    return {"out": _global_error(out - ref[:, rows], ref[:, rows])}


def _chunked_rows(
    plan: Any, sizes: dict[str, int], queries: list[str], cp: ContextParallel
) -> tuple[list[int], dict[str, Any]]:
    """This rank's context tokens (``cp``'s placement), then its part of the
    queries (a placement of every group, used only to split the queries)."""
    full = ContextParallel(plan, sizes)
    offsets, at = {}, 0
    for g, n in sizes.items():
        offsets[g] = at
        at += n
    rows = []
    for g in sizes:
        shards = (cp if g not in queries else full).placement.group(g)
        rows += [offsets[g] + p for a, b in shards.ranges[cp.rank] for p in range(a, b)]
    local_sizes = {g: (cp.local_sizes[g] if g not in queries else full.local_sizes[g]) for g in sizes}
    return rows, local_sizes


def case_chunked_transformer(world: int) -> dict[str, Any]:
    """An untied Transformer stack, anchors sharded, each rank's queries in
    chunks: equals one shot; with RoPE (positions of the queries) it refuses."""
    program = patternc.compile(
        "groups anchors queries\ntypes { a: anchors\n q: queries }\nanchors -> anchors\nqueries -> anchors"
    )
    sizes = {"anchors": 7, "queries": 29}
    torch.manual_seed(4)
    x = torch.randn(2, sum(sizes.values()), 16, dtype=torch.float64)
    result: dict[str, Any] = {}
    for pos_emb in ("none", "rope"):
        torch.manual_seed(0)
        model = small_stack(program, pos_emb, untied=True).eval()
        plan = next(iter(model.plans.values()))
        with torch.no_grad():
            ref = model(x, sizes)
        cp = ContextParallel(plan, {"anchors": 7, "queries": 0})
        rows, local_sizes = _chunked_rows(plan, sizes, ["queries"], cp)
        try:
            out = chunked(model, x[:, rows], local_sizes, ["queries"], chunk_size=4, context_parallel=cp)
        except ValueError as error:
            result[f"{pos_emb}_error"] = str(error)
            continue
        result["out" if pos_emb == "none" else "rope_out"] = _global_error(out - ref[:, rows], ref[:, rows])
    return result


def case_padding_on_one_rank(world: int) -> dict[str, Any]:
    """Rank 1 passes a key padding mask, the others none (the anchors' keys
    go around the ring, where a mask channel changes every message's size)."""
    module, _, plan = _anchor_module("joint")
    n = sum(ABUPT.values())
    x = torch.randn(2, n, 16, dtype=torch.float64)
    cp = ContextParallel(plan, ABUPT)
    mask = cp.shard(torch.ones(2, n, dtype=torch.bool)) if cp.rank == 1 else None
    try:
        with cp:
            module.mixed_attention(cp.shard(x), _specs(cp.local_sizes), plan, key_padding_mask=mask)
    except DistributedError as error:
        return {"error": str(error)}
    return {"error": ""}


def _per_token(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).square().sum(-1)


def _loss_reference() -> tuple[
    nn.Module, Any, dict[str, int], tuple[Tensor, Tensor, Tensor], Tensor, dict[str, Tensor]
]:
    """A small stack on documents and anchors, a token-mean loss over a random
    subset of targets in one process: the model (gradients zeroed), its bound
    plan, sizes, (input, target, kept tokens), the loss and its gradients."""
    source = "groups doc* anchors queries\ndoc* -> self [causal]\nanchors, queries -> anchors"
    sizes = {"doc0": 9, "doc1": 3, "doc2": 14, "anchors": 5, "queries": 40}
    torch.manual_seed(0)
    model = small_stack(patternc.compile(source), "rope")
    plan = next(iter(model.plans.values())).bind(list(sizes))
    n = sum(sizes.values())
    torch.manual_seed(2)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    target = torch.randn(2, n, 16, dtype=torch.float64)
    keep = torch.rand(2, n) > 0.4
    ref_loss = (_per_token(model(x, sizes), target) * keep).sum() / keep.sum()
    ref_loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return model, plan, sizes, (x, target, keep), ref_loss, reference


def _loss_case(world: int, grads: GradReduction, wrap: Callable[[nn.Module], nn.Module]) -> dict[str, Any]:
    """A Transformer trained on a token-mean loss (some targets ignored, so
    every rank counts a different number of tokens): parameter gradients
    after the wrapper's reduction against one process's."""
    model, plan, sizes, (x, target, keep), ref_loss, reference = _loss_reference()
    cp = ContextParallel(plan, sizes)
    wrapped = wrap(model)
    with cp:
        out = wrapped(cp.shard(x), cp.local_sizes)
    local_keep = cp.shard(keep)
    local_sum = (_per_token(out, cp.shard(target)) * local_keep).sum()
    loss = patternc.distributed.global_mean_loss(local_sum, local_keep.sum(), grads=grads)
    loss.backward()

    def grad_error() -> float:
        worst = 0.0
        for name, p in model.named_parameters():
            grad = p.grad
            assert grad is not None, name
            if hasattr(grad, "full_tensor"):  # FSDP2: this rank's shard of a DTensor
                grad = grad.full_tensor()
            elif grads == "sum":
                dist.all_reduce(grad)
            worst = max(worst, float((grad - reference[name]).norm() / reference[name].norm()))
        return worst

    result = {
        "grad_params": grad_error(),
        "loss": abs(float(loss - ref_loss)) / float(ref_loss),
        "local_tokens": int(local_keep.sum()),
    }
    if grads == "sum":  # the mean over this rank's tokens, gradients summed: what not to do
        model.zero_grad()
        with cp:
            out = model(cp.shard(x), cp.local_sizes)
        (_per_token(out, cp.shard(target)) * local_keep).sum().div(local_keep.sum()).backward()
        result["local_mean"] = grad_error()
    return result


def case_loss_ddp(world: int) -> dict[str, Any]:
    return _loss_case(world, "mean", nn.parallel.DistributedDataParallel)


def case_loss_fsdp2(world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    return _loss_case(world, "mean", fully_shard)


def case_loss_all_reduce(world: int) -> dict[str, Any]:
    return _loss_case(world, "sum", lambda model: model)


def case_mesh_fsdp2(world: int) -> dict[str, Any]:
    """A ``("dp", "cp")`` mesh (4 ranks): each data-parallel row holds one
    sample of the batch, sharded over its ``mesh["cp"]``; ``fully_shard`` on
    the whole mesh (replicated over "dp", sharded over "cp") averages the
    gradients over all four ranks: they equal one process's on the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if world != 4:
        return {"skipped": True}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    model, plan, sizes, (x, target, keep), ref_loss, reference = _loss_reference()
    row = mesh.get_local_rank("dp")  # this row's sample
    cp = ContextParallel(plan, sizes, mesh["cp"])
    fully_shard(model, mesh=mesh)
    with cp:
        out = model(cp.shard(x[row : row + 1]), cp.local_sizes)
    local_keep = cp.shard(keep[row : row + 1])
    local_sum = (_per_token(out, cp.shard(target[row : row + 1])) * local_keep).sum()
    loss = patternc.distributed.global_mean_loss(local_sum, local_keep.sum(), grads="mean")
    loss.backward()
    worst = 0.0
    for name, p in model.named_parameters():
        grad = p.grad
        assert grad is not None, name
        full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        worst = max(worst, float((full - reference[name]).norm() / reference[name].norm()))
    return {"grad_params": worst, "loss": abs(float(loss - ref_loss)) / float(ref_loss)}


def case_mismatch(world: int) -> dict[str, Any]:
    """Ranks that build the sharding from different sizes get a clear error, not a hang."""
    plan = patternc.compile("groups anchors queries\n* -> anchors").patterns["default"]
    sizes = {"anchors": 4, "queries": 10 + dist.get_rank()}
    try:
        ContextParallel(plan, sizes)
    except DistributedError as error:
        return {"error": str(error)}
    return {"error": ""}


def case_rank_fails(world: int) -> dict[str, Any]:
    """The last rank fails before the forward (an exception in its own code):
    the others raise DistributedError when the group's timeout ends, not hang."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    _, forward, plan = _attention("groups anchors queries\n* -> anchors", {"anchors": 8, "queries": 8})
    cp = ContextParallel(plan, {"anchors": 8, "queries": 8}, group)
    if dist.get_rank() == world - 1:
        time.sleep(6)  # failed: never joins the collective (stays up so the others time out)
        return {"error": "failed on purpose"}
    start = time.perf_counter()
    try:
        with cp:
            forward(torch.randn(2, 8, 16, dtype=torch.float64), cp.local_sizes)
    except DistributedError as error:
        return {"error": str(error), "seconds": time.perf_counter() - start}
    return {"error": ""}


def case_ring_rank_fails(world: int) -> dict[str, Any]:
    """The last rank fails between two forwards of a ring: the others' wait
    on the posted exchange raises DistributedError when the timeout ends."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    sizes = {"a": 16}
    _, forward, plan = _attention("groups a\na -> a", sizes)
    cp = ContextParallel(plan, sizes, group, strategy="ring")
    x = cp.shard(torch.randn(2, 16, 16, dtype=torch.float64))
    with torch.no_grad(), cp:
        forward(x, cp.local_sizes)  # every rank: the first forward's checks pass
    if dist.get_rank() == world - 1:
        time.sleep(6)  # failed: never posts its side of the ring
        return {"error": "failed on purpose"}
    start = time.perf_counter()
    try:
        with torch.no_grad(), cp:
            forward(x, cp.local_sizes)
    except DistributedError as error:
        return {"error": str(error), "seconds": time.perf_counter() - start}
    return {"error": ""}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}
TIMEOUT_SECONDS = 30


def worker(
    rank: int, world: int, port: int, out_dir: str, names: list[str], module: str = "distributed_cases"
) -> None:
    """One rank: the cases ``names`` of ``module``'s ``CASES`` (within its
    ``TIMEOUT_SECONDS`` per collective), results written as each ends."""
    import importlib

    cases = importlib.import_module(module)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=cases.TIMEOUT_SECONDS)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = cases.CASES[name](world)
        except Exception:  # reported to the test, which fails on it
            results[name] = {"exception": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    if any(name.endswith("rank_fails") for name in names):
        # After a timed-out collective gloo's state is undefined: tearing it down
        # (destroy_process_group, or the destructors at interpreter exit) may abort
        # with "terminate called without an active exception". The results are on
        # disk, so leave as torch's docs advise after a timeout: end the process.
        os._exit(0)
    if _TEARDOWN_MAY_DEADLOCK:
        # torch 2.6's gloo group joins its worker threads holding the GIL, while a
        # worker may be freeing a finished collective's tensors, which needs the
        # GIL: one rank of four hung so in about every run. Once every rank is past
        # its last collective, leave without the teardown.
        dist.barrier()
        os._exit(0)
    dist.destroy_process_group()


_TEARDOWN_MAY_DEADLOCK = torch.__version__ < (2, 11)
"""Seen on torch 2.6; 2.11 and 2.13 tear down cleanly (versions between unchecked)."""


def spawn(
    world: int, names: list[str], out_dir: str, port: int, module: str = "distributed_cases"
) -> list[dict[str, Any]]:
    """Run the cases ``names`` of ``module`` on ``world`` gloo processes;
    every rank's results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, port, out_dir, names, module), nprocs=world, join=True)
    results = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results


if __name__ == "__main__":
    world = int(sys.argv[1])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rank, result in enumerate(
            spawn(
                world, sys.argv[2:] or [n for n in CASES if not n.endswith("rank_fails")], tmp, 29700 + world
            )
        ):
            for name, metrics in result.items():
                print(rank, name, json.dumps(metrics)[:1500])
