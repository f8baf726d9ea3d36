"""Host time per attention call, executor by executor, and where auto's goes.

For a cached layout, times N back-to-back calls of each executor (host time:
no synchronisation inside the loop, the device queue absorbs the kernels)
and N calls with a synchronisation after each (wall time), then profiles
``auto``'s calls with cProfile. Run on the GPU:

    python benchmarks/bench_host.py [--calls 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import patternc
from patternc.nn.executors import AttentionInputs, get_executor

LAYOUTS = {
    "self-anchor 2x(1k+4k)": (
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_* -> surface_anchors\nvolume_* -> volume_anchors",
        {"surface_anchors": 1024, "surface_queries": 4096, "volume_anchors": 1024, "volume_queries": 4096},
    ),
    "16 documents": ("groups doc*\ndoc* -> self [causal]", {f"doc{i}": 512 + 64 * i for i in range(16)}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print("| layout | executor | host us/call | wall us/call (synced) |\n| --- | --- | --- | --- |")
    for name, (source, sizes) in LAYOUTS.items():
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        layout = plan.layout(sizes)
        q, k, v = (torch.randn(1, layout.n_tokens, 12, 64, device=device, dtype=dtype) for _ in range(3))
        inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
        for executor_name in ["batched", "varlen", "auto", "flex", "auto"]:
            run = get_executor(executor_name)
            for _ in range(10):
                run(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            hosts, walls = [], []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(args.calls):
                    run(inputs)
                hosts.append((time.perf_counter() - start) / args.calls)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.calls // 3):
                    run(inputs)
                    if device == "cuda":
                        torch.cuda.synchronize()
                walls.append((time.perf_counter() - start) / (args.calls // 3))
            print(
                f"| {name} | {executor_name} | {statistics.median(hosts) * 1e6:.1f} | {statistics.median(walls) * 1e6:.1f} |"
            )
        profile = cProfile.Profile()
        run = get_executor("auto")
        profile.enable()
        for _ in range(args.calls):
            run(inputs)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        print(f"\nauto on {name}, {args.calls} calls, by own time:\n```\n{text.getvalue()[-2500:]}\n```\n")


if __name__ == "__main__":
    main()
