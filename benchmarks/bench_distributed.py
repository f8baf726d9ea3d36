"""Context-parallel attention against one process: traffic, memory, time.

For each layout and world size R, side by side:
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
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from peak_memory import Peak

import patternc
from patternc.distributed import ContextParallel

HIDDEN, HEADS = 192, 3


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--layouts", nargs="+", default=None, help="only layouts whose name contains one of these"
    )
    args = parser.parse_args()
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
