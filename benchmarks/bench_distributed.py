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
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from patternc.distributed import ContextParallel, place, schedule
from patternc.modifiers import allowed_pairs

HIDDEN, HEADS = 192, 3


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
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--balance", action="store_true", help="only the placement's balance and traffic (no processes)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--layouts", nargs="+", default=None, help="only layouts whose name contains one of these"
    )
    args = parser.parse_args()
    if args.balance:
        balance_report(args.worlds or [2, 4, 8, 16, 32, 64])
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
