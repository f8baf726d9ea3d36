"""Runtime benchmark: MixedAttention executors side by side on the AB-UPT layout.

Layout: 2 branches x (1024 anchors + 4096 queries), dim 192, 3 heads, batch 1,
the ``self_anchor``, ``cross_anchor`` and ``joint`` patterns of
``examples/ab_upt.pc``. For each pattern and executor: median forward time
(no grad), median forward+backward time, and the peak extra memory of each
(resident-set high-water mark above the state before the first call; every
variant runs in a fresh process so peaks do not mix). Ratios are against
``dense``.

Run: ``python benchmarks/bench_runtime.py [--repeat 5] [--anchors 1024 --queries 4096]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("self_anchor", "cross_anchor", "joint")
IMPLEMENTATIONS = ("batched", "loop", "dense")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(
    pattern: str, impl: str, anchors: int, queries: int, dim: int, heads: int, repeat: int
) -> dict[str, float]:
    import torch

    import patternc
    from patternc.nn import MixedAttention

    torch.manual_seed(0)
    plan = patternc.compile(ROOT / "examples" / "ab_upt.pc").patterns[pattern]
    sizes = {g: anchors if g.endswith("anchors") else queries for g in plan.groups}
    specs = plan.token_specs(sizes)
    module = MixedAttention(
        patternc.MixedAttentionConfig(hidden_dim=dim, num_heads=heads, implementation=impl)
    )
    x = torch.randn(1, sum(sizes.values()), dim)
    base = _rss_kb("VmRSS")

    def forward() -> None:
        with torch.no_grad():
            module(x, specs, plan)

    def forward_backward() -> None:
        xg = x.detach().requires_grad_()
        out, _ = module(xg, specs, plan)
        out.sum().backward()

    result: dict[str, float] = {}
    for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        fn()  # warm-up (and first-layout checks)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = statistics.median(times) * 1e3
        result[f"{name}_peak_mb"] = (_rss_kb("VmHWM") - base) / 1024
    return result


def run_worker(args: argparse.Namespace, pattern: str, impl: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        pattern,
        impl,
        "--anchors",
        str(args.anchors),
        "--queries",
        str(args.queries),
        "--dim",
        str(args.dim),
        "--heads",
        str(args.heads),
        "--repeat",
        str(args.repeat),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--anchors", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--worker", nargs=2, metavar=("PATTERN", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.anchors, args.queries, args.dim, args.heads, args.repeat)))
        return

    import torch

    tokens = 2 * (args.anchors + args.queries)
    print(
        f"MixedAttention executors, AB-UPT layout: 2 x ({args.anchors} anchors + {args.queries} queries) = "
        f"{tokens} tokens, dim {args.dim}, {args.heads} heads, batch 1, float32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeat}; ratios vs dense (speed-up = dense/x, "
        "memory = x/dense)"
    )
    header = (
        f"{'pattern':<13} {'executor':<8} {'fwd ms':>9} {'speed-up':>8} {'fwd+bwd ms':>11} {'speed-up':>8} "
        f"{'fwd MB':>8} {'mem':>6} {'fwd+bwd MB':>11} {'mem':>6}"
    )
    print(header)
    print("-" * len(header))
    for pattern in args.patterns:
        results = {impl: run_worker(args, pattern, impl) for impl in args.implementations}
        dense = results.get("dense")
        for impl, r in results.items():
            print(
                f"{pattern:<13} {impl:<8} {r['fwd_ms']:>9.1f} {_ratio(r, dense, 'fwd_ms', True):>8} "
                f"{r['fwd_bwd_ms']:>11.1f} {_ratio(r, dense, 'fwd_bwd_ms', True):>8} "
                f"{r['fwd_peak_mb']:>8.0f} {_ratio(r, dense, 'fwd_peak_mb', False):>6} "
                f"{r['fwd_bwd_peak_mb']:>11.0f} {_ratio(r, dense, 'fwd_bwd_peak_mb', False):>6}"
            )


def _ratio(r: dict[str, float], dense: dict[str, float] | None, key: str, speed: bool) -> str:
    """Speed-up (dense / r) for times, fraction (r / dense) for memory."""
    if dense is None or not dense[key] or not r[key]:
        return "-"
    return f"{(dense[key] / r[key]) if speed else (r[key] / dense[key]):.2f}"


if __name__ == "__main__":
    main()
