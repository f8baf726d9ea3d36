"""Chunked inference against one shot: peak memory and time.

An AB-UPT-style stack (4 pre-norm transformer blocks, surface and volume
anchors, queries that attend to their branch's anchors) runs over N query
points once in one shot and then with the queries in chunks (anchors'
keys/values computed once per layer, ``patternc.nn.chunked``). Each variant
runs in a fresh process so its peak is its own: the CUDA allocator's peak on
a GPU, else the rise of the process's peak RSS. The output of every chunked
run is compared with the one-shot output.

    python benchmarks/bench_chunked.py [--queries 200000] [--anchors 2048] [--chunks 4096 16384 65536]
        [--compare-kv]   (each run also with K/V projected for every token,
                          as without key spaces, side by side)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch
from peak_memory import Peak

import patternc
import patternc.nn
from patternc.configs import TransformerBlockConfig
from patternc.lower.layout import KeySpace

SOURCE = (
    "groups surface_anchors surface_queries volume_anchors volume_queries\n"
    "surface_anchors -> surface_anchors\nvolume_anchors -> volume_anchors, surface_anchors\n"
    "surface_queries -> surface_anchors\nvolume_queries -> volume_anchors, surface_anchors\n"
)
HIDDEN, HEADS, LAYERS = 192, 3, 4


def variant(queries: int, anchors: int, chunk: int, device: str, all_kv: bool = False) -> dict[str, Any]:
    """``all_kv``: every layout's key space read as all tokens, so the layers
    project K/V for the queries too: what the key space saves."""
    if all_kv:
        KeySpace.identity = property(lambda space: True)  # type: ignore[method-assign,assignment]
    plan = patternc.compile(SOURCE).patterns["default"]
    sizes = {
        "surface_anchors": anchors,
        "surface_queries": queries // 2,
        "volume_anchors": anchors,
        "volume_queries": queries - queries // 2,
    }
    torch.manual_seed(0)
    blocks = (
        torch.nn.ModuleList(
            patternc.nn.TransformerBlock(TransformerBlockConfig(hidden_dim=HIDDEN, num_heads=HEADS))
            for _ in range(LAYERS)
        )
        .to(device)
        .eval()
    )

    def model(x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        specs = [patternc.TokenSpec(name=g, size=n) for g, n in s.items()]
        for block in blocks:
            x = block(x, specs, plan)
        return x

    x = torch.randn(1, sum(sizes.values()), HIDDEN, device=device)
    with Peak(torch.device(device)) as peak:
        start = time.perf_counter()
        with torch.no_grad():
            if chunk:
                names = ["surface_queries", "volume_queries"]
                out = patternc.nn.chunked(model, x, sizes, names, chunk_size=chunk, progress=True)
            else:
                out = model(x, sizes)
    seconds = time.perf_counter() - start
    torch.save(out.cpu(), f"/tmp/bench_chunked_{chunk}_{int(all_kv)}.pt")
    return {"chunk": chunk, "all_kv": all_kv, "seconds": seconds, "peak": peak.bytes}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--anchors", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compare-kv", action="store_true", help="also each run with K/V projected for every token"
    )
    parser.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--all-kv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(variant(args.queries, args.anchors, args.variant, args.device, args.all_kv)))
        return
    rows = []
    runs = [
        (chunk, all_kv)
        for chunk in [0, *args.chunks]
        for all_kv in ([False, True] if args.compare_kv else [False])
    ]
    for chunk, all_kv in runs:
        cmd = [
            sys.executable,
            __file__,
            "--queries",
            str(args.queries),
            "--anchors",
            str(args.anchors),
            "--device",
            args.device,
            "--variant",
            str(chunk),
            *(["--all-kv"] if all_kv else []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one_shot = torch.load("/tmp/bench_chunked_0_0.pt")
    print(
        f"\n## Chunked inference ({args.device}; {LAYERS} blocks, hidden {HIDDEN}, 2x{args.anchors} anchors, "
        f"{args.queries:,} queries, float32)\n"
    )
    # the input (and the model) are allocated before the peak is measured: the floor is the output
    floor = (args.queries + 2 * args.anchors) * HIDDEN * 4
    print(
        f"Floor: the output, {floor / 2**20:.0f} MB (the input is there before the count starts); "
        "the rest is one chunk's work.\n"
    )
    print("| run | peak MB | vs one shot | peak above the floor, MB | seconds | max abs diff to one shot |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows[0]
    for row in rows:
        out = torch.load(f"/tmp/bench_chunked_{row['chunk']}_{int(row['all_kv'])}.pt")
        diff = (out - one_shot).abs().max().item()
        label = "one shot" if not row["chunk"] else f"chunks of {row['chunk']:,}"
        label += ", K/V of every token" if row["all_kv"] else ""
        print(
            f"| {label} | {row['peak'] / 2**20:.0f} | {row['peak'] / base['peak']:.2f} | "
            f"{(row['peak'] - floor) / 2**20:.0f} | {row['seconds']:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
