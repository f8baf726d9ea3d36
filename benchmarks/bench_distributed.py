"""Context-parallel attention against one process: balance, traffic, memory, time.

The placement alone (no processes; ``--balance``), per layout and world size
2 to 64: attention FLOPs and tokens per rank (max / mean, counted from the
positions each rank holds) and the key/value tokens received per forward
against the minimum the mask needs (what ``patternc compile --world-size``
reports: each ring runs over the ranks holding its call's tokens, each
halo sends a rank only the keys it reads), summed over the ranks and for
the rank that receives most, what each call would receive on the cheaper
of gather and ring (no halo), and the strategies of the calls that move keys:

    python benchmarks/bench_distributed.py --balance [--worlds 2 4 8 16 32 64]

``--balance`` also compares, per layout and world size, the bytes the
placement's schedule moves with the bytes of head-parallel mode (two
all-to-alls of Q, K, V and the output; see ``patternc.distributed.heads``)
and says which ``ContextParallel(mode="auto")`` picks.

Then, run on processes, for each layout and world size R, side by side:
- per rank, key/value bytes received in one forward (measured, padding
  included) against the minimum the plan implies (keys the rank's queries
  may see and it does not hold), also per call;
- per-rank peak memory of one step against 1/R of the one-process run plus
  the gathered keys/values;
- time (median of repeats) against the one-process run.

CPU (gloo, processes spawned here; peak memory is the rise of the peak RSS):

    python benchmarks/bench_distributed.py [--worlds 2 4] [--repeat 5] [--scale 1]

GPUs (NCCL, one process per GPU; peak memory from the CUDA allocator):

    torchrun --nproc-per-node N benchmarks/bench_distributed.py

The placement's and the schedule's own cost (``--schedule-cost``; no
processes): CPU seconds of ``place`` and of ``schedule`` (best of
``--repeat``) on 1M-token layouts with windows and global tokens at many
ranks, where each rank's halo is found by bisect over the ranks' ranges,
and of ``place`` on 1,024 and 4,096 block-causal frames at 8 ranks:

    python benchmarks/bench_distributed.py --schedule-cost [--worlds 64 256]

The ring's kernel alone (``--kernel-rate``; one device, no processes): for
each layout the blocks that R virtual ranks compute (``--worlds``, 8 by
default; the ranks one after another, received blocks random) on the
blockwise kernel with the log-sum-exp merge, forward and forward+backward,
in useful TF/s of the mask beside the unsharded executor's on the same
layout, and their ratio (bfloat16 on CUDA, float32 on CPU):

    python benchmarks/bench_distributed.py --kernel-rate [--worlds 8] [--tiny] [--tokens N]

At 65k tokens over 8 ranks a rank's blocks of short documents are a few
hundred to two thousand tokens: microseconds of GPU work each, so the host's
launches set their time. ``--tokens`` grows the layouts (documents keep
their count and grow with the total) to the lengths context parallelism is
used at.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from peak_memory import Peak
from torch import Tensor

import patternc
from patternc.distributed import ContextParallel, place, schedule
from patternc.distributed.blockwise import BlockKernel, Kernel, StepArgs
from patternc.distributed.calls import BlockwiseCall, ExecutorCalls, _Run
from patternc.distributed.heads import choose_mode, hybrid_rows
from patternc.distributed.passing import Attend
from patternc.distributed.placement import Placement, ShardedSchedule, Strategy, rank_loads
from patternc.distributed.rank import Comm, RankTokens
from patternc.modifiers import allowed_pairs
from patternc.nn.executors import get_executor
from patternc.nn.executors.common import AttentionInputs, Executor

HIDDEN, HEADS = 192, 3
HOST = 8
"""Ranks per group of the hybrid estimate (the GPUs of one host)."""


def long_tailed(seed: int, sigma: float, count: int = 64, total: int = 65536) -> dict[str, int]:
    """``count`` document lengths drawn log-normally (``sigma``), ``total`` tokens together."""
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0, sigma) for _ in range(count)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[0] += total - sum(sizes)
    return {f"doc{i}": n for i, n in enumerate(sizes)}


def balance_layouts() -> dict[str, tuple[str, dict[str, int]]]:
    """name -> (pattern source, sizes) for the placement-only report."""
    abupt = "groups surface_anchors surface_queries volume_anchors volume_queries\n"
    unequal = {
        "surface_anchors": 16384,
        "surface_queries": 65536,
        "volume_anchors": 16384,
        "volume_queries": 262144,
    }
    equal = {**unequal, "surface_queries": 262144}
    docs = "groups doc*\ndoc* -> self [causal]"
    return {
        "64 long-tailed causal documents, 64k tokens (lognormal sigma 1.0)": (docs, long_tailed(0, 1.0)),
        "64 long-tailed causal documents, 64k tokens (lognormal sigma 1.5)": (docs, long_tailed(0, 1.5)),
        "64 long-tailed causal documents, 64k tokens (lognormal sigma 2.0)": (docs, long_tailed(2, 2.0)),
        "AB-UPT self-anchor, unequal branches (16k anchors each, 64k / 256k queries)": (
            abupt + "surface_* -> surface_anchors\nvolume_* -> volume_anchors",
            unequal,
        ),
        "AB-UPT cross-anchor, unequal branches": (
            abupt + "surface_* -> surface_anchors\nvolume_* -> volume_anchors, surface_anchors",
            unequal,
        ),
        "AB-UPT joint, equal branches (16k anchors, 256k queries each)": (
            abupt + "* -> surface_anchors, volume_anchors",
            equal,
        ),
        "one causal document, 256-token window, 64k tokens": (
            "groups text\ntext -> self [causal, window 256]",
            {"text": 65536},
        ),
        "4 global tokens + 256-token causal window, 64k tokens": (
            "groups sink text\nsink -> *\ntext -> sink, self [causal, window 256]",
            {"sink": 4, "text": 65532},
        ),
        "4 global tokens every token reads + 256-token causal window, 64k tokens": (
            "groups sink text\nsink -> *\ntext -> sink, text[causal, window 256]",
            {"sink": 4, "text": 65532},
        ),
        "Longformer: 4 global tokens mid-sequence, 256-token causal band across them, 64k tokens": (
            "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 256, across]",
            {"left": 32768, "sink": 4, "right": 32764},
        ),
    }


def _loads(plan: Any, placement: Any) -> tuple[list[int], list[int]]:
    """Attention FLOPs (allowed query-key pairs) and tokens per rank, from the positions each holds."""
    world = placement.world_size
    flops = [0] * world
    offsets, at = {}, 0
    for g in placement.groups:
        offsets[g.name] = at
        at += g.size or 0
    for call in plan.calls:
        for q in call.queries:
            for key in call.keys:
                n_k = placement.group(key.name).size or 0
                shift = offsets[key.name] - offsets[q]
                for r, ranges in enumerate(placement.group(q).ranges):
                    for a, b in ranges:
                        flops[r] += allowed_pairs(b, n_k, key.modifiers, shift)
                        flops[r] -= allowed_pairs(a, n_k, key.modifiers, shift)
    return flops, [placement.tokens(r) for r in range(world)]


def balance_report(worlds: list[int]) -> None:
    """The placement-only table (see the module docs)."""
    print("\n## Placement: balance and traffic per layout and world size (no processes)\n")
    print(
        "| layout | ranks | FLOPs max/mean | tokens max/mean | groups split | widest split (ranks) | "
        "received / minimum (all ranks) | received / minimum (max rank) | without halos (gather or ring "
        "per call): received / minimum (all ranks) | calls moving keys |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (source, sizes) in balance_layouts().items():
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        print(f"| {name} | | | | | | | | | |")
        for world in worlds:
            placement = place(plan.groups, plan.calls, sizes, world)
            plan_schedule = schedule(plan.calls, placement)
            flops, tokens = _loads(plan, placement)
            holders = [sum(1 for ranges in g.ranges if ranges) for g in placement.groups]
            split = sum(1 for h in holders if h > 1)
            received, minimum = plan_schedule.received, plan_schedule.minimum
            # for comparison: each call on the cheaper of gather and ring, no halo
            without_halo = 0
            for c in plan_schedule.calls:
                others = [n for kind, n in c.moved if kind != "halo"]
                own = sum(plan_schedule.call_received(c, r) for r in range(world))
                without_halo += min(others) if others else own

            kinds = [c.strategy for c in plan_schedule.calls if c.strategy != "local"]
            calls = ", ".join(
                f"{n} {kind}" for kind in ("gather", "ring", "halo") if (n := kinds.count(kind))
            )

            def ratio(got: int, least: int) -> str:
                return f"{got / least:.2f}x" if least else ("0 / 0" if not got else f"{got} / 0")

            print(
                f"| | {world} | {max(flops) * world / sum(flops):.2f} | {max(tokens) * world / sum(tokens):.2f} "
                f"| {split} | {max(holders)} | {sum(received)} / {sum(minimum)} = "
                f"{ratio(sum(received), sum(minimum))} | {max(received)} / {max(minimum)} = "
                f"{ratio(max(received), max(minimum))} | {without_halo} / {sum(minimum)} = "
                f"{ratio(without_halo, sum(minimum))} | {calls} |"
            )


def heads_layouts() -> dict[str, tuple[str, dict[str, int]]]:
    """The placement report's layouts and three that read across every rank."""
    return {
        **balance_layouts(),
        "VLM: 16 registers + 16k image tokens bidirectional, 48k text tokens causal over all": (
            "groups registers image text\nregisters, image -> registers, image\n"
            "text -> registers, image, text[causal]",
            {"registers": 16, "image": 16384, "text": 49136},
        ),
        "one causal document, 64k tokens": ("groups text\ntext -> self [causal]", {"text": 65536}),
        "full attention, 64k tokens": ("groups x\nx -> x  # noqa: W103", {"x": 65536}),
    }


def heads_report(worlds: list[int]) -> None:
    """Bytes per forward of the schedule against head-parallel mode (see the module docs)."""
    width = HIDDEN
    print("\n## Schedule (local / gather / ring) against head-parallel mode (all-to-all), no processes\n")
    print(
        f"MB received per forward by the rank receiving most, at model width {width} in 2-byte elements "
        '(the backward moves as much again); auto: the mode `ContextParallel(mode="auto")` picks '
        "where the heads are a multiple of the ranks.\n"
    )
    print(
        f"Hybrid (a paper estimate, not run: `patternc.distributed.heads.hybrid_rows`): heads over groups of "
        f"{HOST} ranks, the schedule across the {HOST}-rank groups for each rank's heads; MB within a group "
        "(all-to-alls) + across groups, for the rank receiving most; it needs heads a multiple of "
        f"{HOST}, where head-parallel mode needs a multiple of the ranks.\n"
    )
    print(
        "| layout | ranks | schedule MB | head-parallel MB | head-parallel / schedule | auto picks "
        f"| hybrid over {HOST}-rank groups: within + across MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (source, sizes) in heads_layouts().items():
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        print(f"| {name} | | | | | | |")
        for world in worlds:
            placement = place(plan.groups, plan.calls, sizes, world)
            choice = choose_mode(schedule(plan.calls, placement))
            ring, heads = max(choice.schedule_rows), max(choice.head_rows)
            ratio = f"{heads / ring:.2f}" if ring else "-"
            hybrid = "-"
            if world > HOST and world % HOST == 0:
                within, across = hybrid_rows(plan.groups, plan.calls, sizes, world, HOST)
                worst = max(range(len(within)), key=lambda g: within[g] + across[g])
                hybrid = f"{mb(within[worst] * width * 2)} + {mb(across[worst] * width * 2)}"
            print(
                f"| | {world} | {mb(ring * width * 2)} | {mb(heads * width * 2)} | {ratio} | {choice.mode} "
                f"| {hybrid} |"
            )


def layouts(scale: int) -> dict[str, tuple[str, dict[str, int], bool]]:
    """name -> (pattern source, sizes, backward too)."""
    abupt = "groups surface_anchors surface_queries volume_anchors volume_queries\n"
    a, q = 512 * scale, 8192 * scale
    sizes = {"surface_anchors": a, "surface_queries": q, "volume_anchors": a, "volume_queries": q}
    docs = {f"doc{i}": (64 + 97 * i % 448) * scale for i in range(64)}
    return {
        f"self-anchor 2x({a}+{q}) fwd": (
            abupt + "surface_* -> surface_anchors\nvolume_* -> volume_anchors",
            sizes,
            False,
        ),
        f"self-anchor 2x({a}+{q}) fwd+bwd": (
            abupt + "surface_* -> surface_anchors\nvolume_* -> volume_anchors",
            sizes,
            True,
        ),
        f"joint 2x({a}+{q}) fwd+bwd": (abupt + "* -> surface_anchors, volume_anchors", sizes, True),
        f"64 causal documents ({sum(docs.values())} tokens) fwd+bwd": (
            "groups doc*\ndoc* -> self [causal]",
            docs,
            True,
        ),
        f"full attention {4096 * scale} tokens (ring) fwd+bwd": (
            "groups a b\n* -> *  # noqa: W103",
            {"a": 2048 * scale, "b": 2048 * scale},
            True,
        ),
        f"causal window 256 over {8192 * scale} tokens (ring) fwd+bwd": (
            "groups a\na -> a [causal, window 256]",
            {"a": 8192 * scale},
            True,
        ),
    }


def run_layout(
    name: str,
    source: str,
    sizes: dict[str, int],
    backward: bool,
    repeat: int,
    device: torch.device,
    sharded: bool,
) -> dict[str, Any]:
    plan = patternc.compile(source).patterns["default"]
    plan = plan.bind(list(sizes))
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=HIDDEN, num_heads=HEADS)
    attn = patternc.nn.PatternAttention(config, plan).to(device)
    x_full = torch.randn(1, sum(sizes.values()), HIDDEN, device=device)
    cp = ContextParallel(plan, sizes) if sharded else None
    x = cp.shard(x_full) if cp is not None else x_full
    run_sizes = cp.local_sizes if cp is not None else sizes

    def step() -> None:
        x_in = x.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            if cp is not None:
                with cp:
                    out, _ = attn(x_in, run_sizes)
            else:
                out, _ = attn(x_in, run_sizes)
            if backward:
                out.sum().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if cp is not None:
            dist.barrier()

    step()
    sync()
    with Peak(device) as peak:
        step()
        sync()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {"name": name, "ms": statistics.median(times) * 1e3, "peak": peak.bytes}
    if cp is not None:
        cp.traffic.clear()
        with torch.no_grad(), cp:
            attn(x, run_sizes)
        schedule = cp.schedule_for(plan.layout(run_sizes))
        per_token = 2 * HEADS * (HIDDEN // HEADS) * x.element_size()
        result["received"] = sum(cp.traffic.values())
        result["scheduled"] = schedule.received[cp.rank] * per_token
        result["minimum"] = schedule.minimum[cp.rank] * per_token
        result["gathered"] = sum(sizes[g] for g in schedule.gathered) * per_token
        result["calls"] = [
            (
                c.attention.text(),
                c.strategy,
                schedule.call_received(c, cp.rank) * per_token,
                schedule.call_minimum(c, cp.rank) * per_token,
            )
            for c in schedule.calls
            if c.strategy != "local"
        ]
        result["local_calls"] = sum(1 for c in schedule.calls if c.strategy == "local")
    return result


def worker(
    rank: int, world: int, port: int, out: str, repeat: int, scale: int, sharded: bool, name: str
) -> None:
    """One layout in a fresh process (so the peak RSS is this layout's alone)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = run_layout(name, *layouts(scale)[name], repeat, torch.device("cpu"), sharded)
    with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(
    single: list[dict[str, Any]], by_world: dict[int, list[list[dict[str, Any]]]], backend: str
) -> None:
    print(f"\n## Context-parallel attention ({backend}; hidden {HIDDEN}, {HEADS} heads, batch 1, float32)\n")
    print(
        "| layout | ranks | time ms | vs 1 process | peak MB/rank (max) | 1/R of 1 process + gathered | "
        "received MB/rank (max) | minimum MB/rank (max) | received / minimum |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, base in enumerate(single):
        print(f"| {base['name']} | 1 | {base['ms']:.1f} | 1.00x | {mb(base['peak'])} | | | | |")
        for world, ranks in sorted(by_world.items()):
            rows = [r[i] for r in ranks]
            ms = max(r["ms"] for r in rows)
            peak = max(r["peak"] for r in rows)
            bound = base["peak"] / world + rows[0]["gathered"]
            received = max(r["received"] for r in rows)
            minimum = max(r["minimum"] for r in rows)
            ratio = f"{received / minimum:.2f}" if minimum else ("0 / 0" if not received else "inf")
            print(
                f"| | {world} | {ms:.1f} | {base['ms'] / ms:.2f}x faster | {mb(peak)} | {mb(bound)} | "
                f"{mb(received)} | {mb(minimum)} | {ratio} |"
            )
    for world, ranks in sorted(by_world.items()):
        print(f"\n### Per call and rank, {world} ranks: scheduled / minimum MB received in one forward\n")
        print("| layout | call | strategy | " + " | ".join(f"rank {r}" for r in range(world)) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in range(world)) + " |")
        for i, base in enumerate(single):
            calls = ranks[0][i]["calls"]
            for j, (text, strategy, _, _) in enumerate(calls):
                cells = [f"{mb(r[i]['calls'][j][2])} / {mb(r[i]['calls'][j][3])}" for r in ranks]
                print(f"| {base['name']} | `{text}` | {strategy} | " + " | ".join(cells) + " |")
            local = ranks[0][i]["local_calls"]
            if local:
                print(
                    f"| {base['name']} | {local} call(s) | local | "
                    + " | ".join("0 / 0" for _ in ranks)
                    + " |"
                )


# ------------------------------------------------------------ kernel rate

VLM = "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]"
ABUPT_JOINT = "groups surface_anchors surface_queries volume_anchors volume_queries\n* -> surface_anchors, volume_anchors"
FWD_BWD = 3.5
"""FLOPs of forward and backward against the forward's (the backward recomputes the scores: 2.5x)."""


def rate_layouts(n: int) -> dict[str, tuple[str, dict[str, int], Strategy | None]]:
    """name -> (pattern source, sizes, strategy forced on non-local calls) for
    ``--kernel-rate`` at about ``n`` tokens (AB-UPT: two branches of ``n``
    queries and ``n / 8`` anchors, from 8,192 tokens)."""
    tiny = n < 8192
    a, q = (128, 1024) if tiny else (n // 8, n)
    image = n // 4
    return {
        f"one causal document, {n} tokens": ("groups text\ntext -> self [causal]", {"text": n}, None),
        f"AB-UPT joint 2x({a} anchors + {q} queries), anchors on the ring": (
            ABUPT_JOINT,
            {"surface_anchors": a, "surface_queries": q, "volume_anchors": a, "volume_queries": q},
            "ring",
        ),
        f"VLM 16 registers + {image} image + {n - image - 16} text": (
            VLM,
            {"registers": 16, "image": image, "text": n - image - 16},
            None,
        ),
        f"{16 if tiny else 64} long-tailed causal documents, {n} tokens": (
            "groups doc*\ndoc* -> self [causal]",
            long_tailed(0, 1.0, count=16 if tiny else 64, total=n),
            None,
        ),
    }


@dataclass(frozen=True)
class RateSetup:
    """Heads, head size, dtype, device, block kernel and executor of ``--kernel-rate``."""

    device: torch.device
    dtype: torch.dtype
    heads: int
    dim: int
    kernel: Kernel
    query_chunk: int
    executor: Executor


class VirtualRank:
    """What rank ``rank`` of a placement computes for a layout, without a
    process group: the executor's part (local calls, gathers on the
    executor) and every block of its blockwise calls (its own and gathered
    blocks, each ring step's block it computes), merged by log-sum-exp by the
    ring's autograd function; received blocks are random tensors of their
    sizes. The ranks run one after another on this device."""

    def __init__(
        self, plan: Any, placement: Placement, sharded: ShardedSchedule, rank: int, setup: RateSetup
    ) -> None:
        self.setup = setup
        device, heads, dim, dtype = setup.device, setup.heads, setup.dim, setup.dtype
        tokens = RankTokens(placement, rank, device)
        comm = Comm(None, placement.world_size, {})  # never used: no block leaves this process
        on_executor = [c for c in sharded.calls if not c.blockwise]
        self.executor_calls = ExecutorCalls(on_executor, tokens, plan.name) if on_executor else None
        gen = torch.Generator().manual_seed(rank)

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        n = tokens.n_local
        self.q, self.k, self.v = rand(1, n, heads, dim), rand(1, n, heads, dim), rand(1, n, heads, dim)
        self.grad = rand(1, n, heads, dim)
        self.gathered = {g: rand(1, placement.group(g).size or 0, heads, 2 * dim) for g in sharded.gathered}
        self.layout = plan.layout(placement.local_sizes(rank))
        self.runs: list[tuple[_Run, Tensor, list[Tensor | str]]] = []
        """Per blockwise call: its run (every block a fixed one), its query rows and
        its blocks: rows of this rank's packed keys/values, a gathered group's
        name, or a received block."""
        args = StepArgs(dim, dim**-0.5, 0.0, None, False, setup.kernel)
        for c in sharded.calls:
            if not c.blockwise:
                continue
            call = BlockwiseCall(c, tokens, comm, setup.query_chunk, setup.kernel)
            kernels: list[BlockKernel | None] = []
            blocks: list[Tensor | str] = []
            if call.local is not None:
                kernels.append(call.local)
                blocks.append(call.local_keys.rows)
            for name, kernel in call.gathered.items():
                kernels.append(kernel)
                blocks.append(name)
            if call.halo is not None:
                if call.halo.own is not None:
                    kernels.append(call.halo.own)
                    blocks.append(call.local_keys.rows)
                for halo_step in call.halo.steps:
                    kernels.append(halo_step.kernel)
                    blocks.append(rand(1, halo_step.size, heads, 2 * dim))
            if call.ring is not None:
                for step, kernel in enumerate(call.ring.kernels):
                    kernels.append(kernel)
                    blocks.append(
                        call.local_keys.rows if step == 0 else rand(1, call.ring.sizes[step], heads, 2 * dim)
                    )
            kept = [(k, b) for k, b in zip(kernels, blocks) if k is not None and not k.empty]
            run = _Run(tuple(k for k, _ in kept), None, args)
            self.runs.append((run, call.queries.rows, [b for _, b in kept]))

    def _inputs(self, backward: bool) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        q, k, v = (t.detach().requires_grad_(backward) for t in (self.q, self.k, self.v))
        gathered = {g: t.detach().requires_grad_(backward) for g, t in self.gathered.items()}
        return q, k, v, gathered

    def executor_part(self, backward: bool) -> None:
        """The executor's calls of this rank (the gathered keys/values given)."""
        if self.executor_calls is None:
            return
        q, k, v, gathered = self._inputs(backward)
        with torch.set_grad_enabled(backward):
            packed = torch.cat([k, v], dim=-1)
            inputs = AttentionInputs(q, k, v, self.layout, {}, None, 0.0, None)
            out = self.executor_calls.run(inputs, self.setup.executor, gathered, packed)
            if backward:
                out.backward(self.grad[:, : out.shape[1]])

    def blockwise_part(self, backward: bool) -> None:
        """Every block of this rank's blockwise calls, merged by log-sum-exp."""
        q, k, v, gathered = self._inputs(backward)
        with torch.set_grad_enabled(backward):
            packed = torch.cat([k, v], dim=-1)
            for run, rows, blocks in self.runs:
                kvs = []
                for block in blocks:
                    if isinstance(block, str):
                        kvs.append(gathered[block])
                    elif block.dtype == torch.long:
                        kvs.append(packed.index_select(1, block))
                    else:
                        kvs.append(block.detach().requires_grad_(backward))
                out = Attend.apply(run, q.index_select(1, rows), packed[:, :0], *kvs)
                if backward:
                    out.backward(self.grad[:, : out.shape[1]])


def _median_time(fn: Callable[[], None], repeat: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` (after one untimed call: compilation, caches)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _unsharded(layout: Any, qkvg: tuple[Tensor, ...], setup: RateSetup, backward: bool) -> None:
    """The whole layout on the executor (and its backward)."""
    q, k, v = (t.detach().requires_grad_(backward) for t in qkvg[:3])
    with torch.set_grad_enabled(backward):
        out = setup.executor(AttentionInputs(q, k, v, layout, {}, None, 0.0, None))
        if backward:
            out.backward(qkvg[3])


def _run_ranks(ranks: list[VirtualRank], backward: bool, executor_too: bool) -> None:
    """Every virtual rank's blockwise part (and its executor's part), one rank after another."""
    for r in ranks:
        if executor_too:
            r.executor_part(backward)
        r.blockwise_part(backward)


def _profile(ranks: list[VirtualRank], name: str, device: torch.device) -> str:
    """One forward+backward of every rank's blockwise part under
    ``torch.profiler``, as text printed after the table: where host and
    device time go (the ranks share one device in turn, so the host time
    covers every rank)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _run_ranks(ranks, True, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    text = [f"\nprofile: {name}, one forward+backward of every rank's blockwise part"]
    text.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        text.append(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
        )
    return "\n".join(text)


def kernel_rate(
    worlds: list[int],
    repeat: int,
    tokens: int,
    setup: RateSetup,
    only: list[str] | None,
    with_executor: bool,
    profile: bool = False,
) -> None:
    """The ``--kernel-rate`` table (see the module docs)."""
    from torch._dynamo.utils import counters

    heads, dim, device = setup.heads, setup.dim, setup.device
    work = 4 * heads * dim  # FLOPs of one allowed query-key pair, forward
    print(
        f"\n## Ring kernel rate against the unsharded executor ({device.type}, {setup.dtype}, "
        f"{heads} heads x {dim}, batch 1, kernel {setup.kernel!r}, median of {repeat})\n"
    )
    print(
        "Useful FLOPs: 4 x heads x head size per allowed pair, forward; x3.5 forward+backward. "
        "Ring kernel: every block R virtual ranks compute on the blockwise kernel (ring and halo "
        "steps, their own and gathered blocks), merged by log-sum-exp, ranks one after another, no "
        "communication. All ranks (with --with-executor): the executor's part of every rank as well, "
        "unsharded time / all ranks' time. Flash forward / flash backward: blocks that need no mask "
        "on torch's flash kernels (the forward under --kernel auto; the backward, which recomputes "
        "nothing, under auto and flex). Graphs compiled: "
        "by torch.compile for the ring's blocks (FlexAttention compiles once per block shape).\n"
    )
    print(
        "| layout | R | blockwise share of FLOPs | blocks (flash forward / flash backward) | ring kernel TF/s fwd | unsharded TF/s fwd | "
        "ratio fwd | ring kernel TF/s fwd+bwd | unsharded TF/s fwd+bwd | ratio fwd+bwd | "
        "all ranks vs unsharded fwd+bwd | graphs compiled |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    profiles: list[str] = []
    for name, (source, sizes, strategy) in rate_layouts(tokens).items():
        if only is not None and not any(w in name for w in only):
            continue
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        layout = plan.layout(sizes)
        calls = [c.attention for c in layout.calls]
        total = sum(rank_loads(calls, place(layout.all_groups, calls, sizes, 1)).flops)
        gen = torch.Generator().manual_seed(0)
        qkvg = tuple(
            torch.randn(1, sum(sizes.values()), heads, dim, generator=gen).to(device, setup.dtype)
            for _ in range(4)
        )
        base_fwd = _median_time(functools.partial(_unsharded, layout, qkvg, setup, False), repeat, device)
        base_bwd = _median_time(functools.partial(_unsharded, layout, qkvg, setup, True), repeat, device)
        base_rate_fwd = total * work / base_fwd / 1e12
        base_rate_bwd = total * work * FWD_BWD / base_bwd / 1e12
        print(f"| {name} | 1 | | | | {base_rate_fwd:.3g} | | | {base_rate_bwd:.3g} | | | |")
        for world in worlds:
            placement = place(layout.all_groups, calls, sizes, world)
            sharded = schedule(calls, placement, strategy=strategy)
            ranks = [VirtualRank(plan, placement, sharded, r, setup) for r in range(world)]
            blockwise = sum(rank_loads([c.attention for c in sharded.calls if c.blockwise], placement).flops)
            n_blocks = sum(len(run.fixed) for r in ranks for run, _, _ in r.runs)
            probe = torch.empty(1, 1, heads, dim, device=device, dtype=setup.dtype)
            kernels = [
                (k, run.args) for r in ranks for run, _, _ in r.runs for k in run.fixed if k is not None
            ]
            n_flash_fwd = sum(k.uses_dense(probe, a) for k, a in kernels)
            n_flash_bwd = sum(k.dense_backward(probe, a) for k, a in kernels)
            if not n_blocks:
                print(f"| | {world} | 0 | 0 | no blockwise call | | | | | | | |")
                continue
            compiled = counters["stats"]["unique_graphs"]
            try:
                fwd = _median_time(functools.partial(_run_ranks, ranks, False, False), repeat, device)
                bwd = _median_time(functools.partial(_run_ranks, ranks, True, False), repeat, device)
                whole = None
                if with_executor:
                    whole = _median_time(functools.partial(_run_ranks, ranks, True, True), repeat, device)
            except Exception as error:  # one layout's failure ends its row, not the table
                last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                print(
                    f"| | {world} | {blockwise / total:.2f} | {n_blocks} | failed: {type(error).__name__}: {last[:200]} |"
                )
                print(f"  its blocks (query rows x key rows, per rank): {_block_shapes(ranks)}")
                sys.stdout.flush()
                continue
            if profile:
                profiles.append(_profile(ranks, name, device))
            rate_fwd = blockwise * work / fwd / 1e12
            rate_bwd = blockwise * work * FWD_BWD / bwd / 1e12
            print(
                f"| | {world} | {blockwise / total:.2f} | {n_blocks} ({n_flash_fwd} / {n_flash_bwd}) | {rate_fwd:.3g} | {base_rate_fwd:.3g} | "
                f"{rate_fwd / base_rate_fwd:.2f} | {rate_bwd:.3g} | {base_rate_bwd:.3g} | "
                f"{rate_bwd / base_rate_bwd:.2f} | {f'{base_bwd / whole:.2f}' if whole else ''} | "
                f"{counters['stats']['unique_graphs'] - compiled} |"
            )
            sys.stdout.flush()
    for text in profiles:
        print(text)


def _block_shapes(ranks: Sequence[VirtualRank]) -> list[list[tuple[int, int]]]:
    """Per rank, each blockwise block's query rows and key rows (what a
    failing FlexAttention compile was asked for)."""
    return [
        [(int(rows.numel()), kernel.n_k) for run, rows, _ in r.runs for kernel in run.fixed] for r in ranks
    ]


# ------------------------------------------------------------ paper estimate

NVLINK, IB = 400e9, 50e9
"""Bytes per second a GPU receives: from a GPU of its node (8 to a node), from another node."""
NODE = 8
ESTIMATE_WIDTH = 1024
"""Heads x head size of the estimate (FLOPs and bytes both scale with it; the ratios do not)."""


def estimate_layouts() -> dict[str, tuple[str, dict[str, int]]]:
    """name -> (pattern source, sizes) of ``--estimate``."""
    abupt = "groups surface_anchors surface_queries volume_anchors volume_queries\n"
    equal = {
        "surface_anchors": 16384,
        "surface_queries": 262144,
        "volume_anchors": 16384,
        "volume_queries": 262144,
    }
    return {
        "AB-UPT joint (16k anchors + 256k queries per branch)": (
            abupt + "* -> surface_anchors, volume_anchors",
            equal,
        ),
        "64 long-tailed causal documents, 1M tokens (lognormal sigma 1.0)": (
            "groups doc*\ndoc* -> self [causal]",
            long_tailed(0, 1.0, total=1 << 20),
        ),
    }


@dataclass(frozen=True)
class RankTime:
    """Seconds one rank spends on one forward+backward of attention."""

    compute: float
    communication: float
    serial: float
    overlapped: float


def rank_times(sharded: ShardedSchedule, rank: int, ring_rate: float, executor_rate: float) -> RankTime:
    """The model of one rank (rates in FLOP/s, forward+backward):

    - compute: each call's allowed pairs on the rank x 4 x width x 3.5, at
      ``ring_rate`` on the blockwise kernel, ``executor_rate`` on the executor;
    - bytes: key/value tokens received (the schedule's) x 2 x width x 2 bytes;
      a ring moves them 4 times (blocks forward and backward, float32
      gradients behind them), a gather twice (the all-gather, the
      reduce-scatter of the gradients);
    - links: within a node NVLink, across nodes IB; a ring step waits for its
      slowest hop (IB once the ring leaves a node), a gather receives the
      other nodes' share over IB;
    - serial: compute + communication. Overlapped (as the ring and the
      gather overlap): a ring's transfers hide behind its blocks but for
      one step's worth (the first block, the last gradient going home);
      the gather hides behind the calls that do not read it.
    """
    placement = sharded.placement
    world = placement.world_size
    pair = 4 * ESTIMATE_WIDTH * FWD_BWD
    per_token = 2 * ESTIMATE_WIDTH * 2
    ring_bw = NVLINK if world <= NODE else IB
    remote = max(0, world - NODE) / max(1, world - 1)
    gather_bw = 1 / (remote / IB + (1 - remote) / NVLINK)
    ring_compute = ring_comm = independent = dependent = gather_comm = 0.0
    steps = 1
    for call in sharded.calls:
        pairs = rank_loads([call.attention], placement).flops[rank]
        seconds = pairs * pair / (ring_rate if call.blockwise else executor_rate)
        received = sharded.call_received(call, rank) * per_token
        if call.strategy == "ring":
            ring_compute += seconds
            ring_comm += 4 * received / ring_bw
            steps = max(steps, call.steps)
        elif call.strategy == "gather":
            dependent += seconds
            gather_comm += 2 * received / gather_bw
        else:
            independent += seconds
    ring = max(ring_compute, ring_comm) + min(ring_compute, ring_comm) / steps
    compute = ring_compute + independent + dependent
    communication = ring_comm + gather_comm
    overlapped = max(gather_comm, ring + independent) + dependent
    return RankTime(compute, communication, compute + communication, overlapped)


def measured_rates(path: str | None) -> tuple[float, float] | None:
    """The ring kernel's and the unsharded executor's forward+backward TF/s
    (medians over the rows) of a ``--kernel-rate`` table, the last in the
    file (results files keep earlier runs above newer ones); None without one."""
    import glob

    files = (
        [path]
        if path
        else sorted(glob.glob(os.path.join(os.path.dirname(__file__), "results", "*kernel_rate*.txt")))
    )
    if not files or not os.path.exists(files[-1]):
        return None
    ring, executor = [], []
    for line in open(files[-1]):
        if line.startswith("## Ring kernel rate"):  # a newer table: its rows only
            ring, executor = [], []
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 10 or not cells[1].isdigit():
            continue
        try:
            if cells[1] == "1":
                executor.append(float(cells[8]))
            else:
                ring.append(float(cells[7]))
        except ValueError:
            continue
    if not ring or not executor:
        return None
    return statistics.median(ring), statistics.median(executor)


def estimate(ring_rate: float, executor_rate: float, worlds: list[int], source: str) -> None:
    """The ``--estimate`` table (see the module docs); rates in TF/s."""
    print(
        f"\n## Paper estimate of strong scaling (attention only, forward+backward; ring kernel {ring_rate:.0f} "
        f"TF/s, executor {executor_rate:.0f} TF/s ({source}); NVLink {NVLINK / 1e9:.0f} GB/s within "
        f"{NODE} GPUs, IB {IB / 1e9:.0f} GB/s across)\n"
    )
    print(
        "Efficiency: one GPU's time on the executor / (R x the slowest rank's time). Per GPU: useful "
        "TF/s of the slowest rank's step.\n"
    )
    print(
        "| layout | GPUs | strategies | compute ms (max rank) | communication ms (max rank) | "
        "serial ms | overlapped ms | efficiency serial | efficiency overlapped | TF/s per GPU overlapped |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (text, sizes) in estimate_layouts().items():
        plan = patternc.compile(text).patterns["default"].bind(list(sizes))
        layout = plan.layout(sizes)
        calls = [c.attention for c in layout.calls]
        total = sum(rank_loads(calls, place(layout.all_groups, calls, sizes, 1)).flops)
        flops = total * 4 * ESTIMATE_WIDTH * FWD_BWD
        one = flops / (executor_rate * 1e12)
        print(
            f"| {name} | 1 | | {one * 1e3:.1f} | 0 | {one * 1e3:.1f} | {one * 1e3:.1f} | 1.00 | 1.00 | {executor_rate:.0f} |"
        )
        for world in worlds:
            placement = place(layout.all_groups, calls, sizes, world)
            sharded = schedule(calls, placement)
            times = [rank_times(sharded, r, ring_rate * 1e12, executor_rate * 1e12) for r in range(world)]
            serial = max(t.serial for t in times)
            overlapped = max(t.overlapped for t in times)
            kinds = sorted({c.strategy for c in sharded.calls})
            print(
                f"| | {world} | {', '.join(kinds)} | {max(t.compute for t in times) * 1e3:.1f} | "
                f"{max(t.communication for t in times) * 1e3:.1f} | {serial * 1e3:.1f} | {overlapped * 1e3:.1f} | "
                f"{one / (world * serial):.2f} | {one / (world * overlapped):.2f} | "
                f"{flops / world / overlapped / 1e12:.0f} |"
            )


def schedule_cost_layouts() -> dict[str, tuple[str, dict[str, int]]]:
    million = 1 << 20
    return {
        "4 global tokens every token reads + 256-token causal window, 1M tokens": (
            "groups sink text\nsink -> *\ntext -> sink, text[causal, window 256]",
            {"sink": 4, "text": million - 4},
        ),
        "one causal document, 256-token window, 1M tokens": (
            "groups text\ntext -> self [causal, window 256]",
            {"text": million},
        ),
        "Longformer: 4 global tokens mid-sequence, 256-token causal band across them, 1M tokens": (
            "groups left sink right\nsink -> *\nleft, right -> sink, (left, right)[causal, back 256, across]",
            {"left": million // 2, "sink": 4, "right": million // 2 - 4},
        ),
    }


def schedule_cost(worlds: list[int], repeat: int) -> None:
    """CPU seconds of ``place`` and ``schedule`` per layout and world size (best of ``repeat``)."""
    print("| layout | ranks | place (s) | schedule (s) | strategies | received / minimum |")
    print("|---|---|---|---|---|---|")
    for name, (source, sizes) in schedule_cost_layouts().items():
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        for world in worlds:
            place_s = schedule_s = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                placement = place(plan.groups, plan.calls, sizes, world)
                middle = time.perf_counter()
                sharded = schedule(plan.calls, placement)
                end = time.perf_counter()
                place_s, schedule_s = min(place_s, middle - start), min(schedule_s, end - middle)
            kinds = ", ".join(c.strategy for c in sharded.calls)
            print(
                f"| {name} | {world} | {place_s:.3f} | {schedule_s:.3f} | {kinds} | "
                f"{sum(sharded.received)} / {sum(sharded.minimum)} |"
            )
    # a block-causal family: place reads each call's keys as slices of one
    # run of members (the schedule still visits every key of every call)
    frames = patternc.compile(
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"
    ).patterns["default"]
    print()
    print(
        "| block-causal frames (prompt 4, frames of 3 tokens) | ranks | place (s) | schedule (s) | received / minimum |"
    )
    print("|---|---|---|---|---|")
    for count in (256, 1024, 4096):
        sizes = {"prompt": 4, **{f"frame{i}": 3 for i in range(count)}}
        plan = frames.bind(list(sizes))
        place_s = schedule_s = float("inf")
        traffic = "-"
        for _ in range(repeat):
            start = time.perf_counter()
            placement = place(plan.groups, plan.calls, sizes, 8)
            place_s = min(place_s, time.perf_counter() - start)
            if count <= 1024:  # the schedule visits every key of every call: quadratic here
                start = time.perf_counter()
                sharded = schedule(plan.calls, placement)
                schedule_s = min(schedule_s, time.perf_counter() - start)
                traffic = f"{sum(sharded.received)} / {sum(sharded.minimum)}"
        shown = f"{schedule_s:.3f}" if schedule_s < float("inf") else "-"
        print(f"| {count} frames | 8 | {place_s:.3f} | {shown} | {traffic} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--balance", action="store_true", help="only the placement's balance and traffic (no processes)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--layouts", nargs="+", default=None, help="only layouts whose name contains one of these"
    )
    parser.add_argument(
        "--kernel-rate",
        action="store_true",
        help="the ring's blockwise kernel against the unsharded executor, one device, no processes",
    )
    parser.add_argument(
        "--schedule-cost",
        action="store_true",
        help="CPU time of place and schedule at many ranks (no processes)",
    )
    parser.add_argument("--tiny", action="store_true", help="--kernel-rate at small sizes (CPU)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="--kernel-rate: tokens per layout (65536; 2048 with --tiny): a rank's blocks grow with it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="--kernel-rate: after each row, torch.profiler tables of one forward+backward of its blocks",
    )
    parser.add_argument(
        "--with-executor",
        action="store_true",
        help="--kernel-rate: also time every rank's executor part (local calls; more compilation)",
    )
    parser.add_argument("--kernel", default="auto", choices=["auto", "flex", "reference"])
    parser.add_argument("--backend", default="auto", help="the unsharded and local executor")
    parser.add_argument("--heads", type=int, default=None, help="--kernel-rate heads (16; 2 with --tiny)")
    parser.add_argument("--dim", type=int, default=None, help="--kernel-rate head size (64; 16 with --tiny)")
    parser.add_argument(
        "--estimate", action="store_true", help="paper estimate of strong scaling at 8 and 64 GPUs"
    )
    parser.add_argument("--rate", type=float, default=None, help="--estimate: ring kernel TF/s (fwd+bwd)")
    parser.add_argument(
        "--executor-rate", type=float, default=None, help="--estimate: unsharded executor TF/s (fwd+bwd)"
    )
    parser.add_argument(
        "--rates-from",
        default=None,
        help="--estimate: a --kernel-rate table (default: the newest in results/)",
    )
    args = parser.parse_args()
    if (args.tokens is not None or args.profile) and not args.kernel_rate:
        parser.error("--tokens and --profile belong to --kernel-rate")
    if args.estimate:
        measured = measured_rates(args.rates_from)
        if args.rate is None and measured is None:
            parser.error(
                "--estimate needs the ring kernel's rate: pass --rate TF/s, or --rates-from a --kernel-rate table"
            )
        source = "given"
        ring_rate, executor_rate = args.rate, args.executor_rate
        if measured is not None:
            source = f"medians of {args.rates_from or 'the newest kernel-rate table in results/'}"
            ring_rate = ring_rate or measured[0]
            executor_rate = executor_rate or measured[1]
        estimate(ring_rate, executor_rate or ring_rate, args.worlds or [8, 64], source)
        return
    if args.kernel_rate:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        setup = RateSetup(
            device=device,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            heads=args.heads or (2 if args.tiny else 16),
            dim=args.dim or (16 if args.tiny else 64),
            kernel=args.kernel,
            query_chunk=256,
            executor=get_executor(args.backend),
        )
        tokens = args.tokens or (2048 if args.tiny else 65536)
        kernel_rate(
            args.worlds or [8], args.repeat, tokens, setup, args.layouts, args.with_executor, args.profile
        )
        return
    if args.schedule_cost:
        schedule_cost(args.worlds or [64, 256], args.repeat)
        return
    if args.balance:
        balance_report(args.worlds or [2, 4, 8, 16, 32, 64])
        heads_report(args.worlds or [2, 4, 8, 16, 32, 64])
        return
    args.worlds = args.worlds or [2, 4]
    if "RANK" in os.environ:  # torchrun: NCCL on GPUs
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
        world, rank = dist.get_world_size(), dist.get_rank()
        specs = layouts(args.scale)
        single = (
            [run_layout(n, *s, args.repeat, device, False) for n, s in specs.items()] if rank == 0 else []
        )
        dist.barrier()
        mine = [run_layout(n, *s, args.repeat, device, True) for n, s in specs.items()]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            report(single, {world: gathered}, f"NCCL, {world} x {torch.cuda.get_device_name()}")
        dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    single: list[dict[str, Any]] = []
    by_world: dict[int, list[list[dict[str, Any]]]] = {w: [[] for _ in range(w)] for w in args.worlds}
    names = [n for n in layouts(args.scale) if args.layouts is None or any(w in n for w in args.layouts)]
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(1, _port(), tmp, args.repeat, args.scale, False, name), nprocs=1)
            single.append(json.load(open(os.path.join(tmp, "1-0.json"))))
            for world in args.worlds:
                mp.spawn(
                    worker, args=(world, _port(), tmp, args.repeat, args.scale, True, name), nprocs=world
                )
                for r in range(world):
                    by_world[world][r].append(json.load(open(os.path.join(tmp, f"{world}-{r}.json"))))
    cores = os.cpu_count()
    report(single, by_world, f"gloo on CPU, {cores} cores shared by the ranks")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
