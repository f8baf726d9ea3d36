"""Runtime benchmark: MixedAttention executors side by side on the AB-UPT layout.

Layout: 2 branches x (1024 anchors + 4096 queries), dim 192, 3 heads, batch 1,
the ``self_anchor``, ``cross_anchor`` and ``joint`` patterns of
``examples/ab_upt.patc``. For each pattern and executor: median forward time
(no grad), median forward+backward time, and the peak extra memory of each
(see :mod:`patternc.benchmark`: on CPU every variant runs in a fresh process
so peaks do not mix). Ratios are against ``dense``.

On CPU, ``flex`` runs compiled forward only: torch has no FlexAttention
backward there, so its forward+backward falls back to ``batched`` (marked).

Run: ``python benchmarks/bench_runtime.py [--repeat 5] [--device cuda --dtype bfloat16]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from patternc.benchmark import Measurement, measure, measure_isolated

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("self_anchor", "cross_anchor", "joint")
IMPLEMENTATIONS = ("batched", "loop", "dense", "flex")


def _ratio(value: float, base: float, *, speed: bool) -> str:
    if not (value == value and base == base) or not value or not base:
        return "-"
    return f"{(base / value) if speed else (value / base):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--anchors", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    args = parser.parse_args()

    source = (ROOT / "examples" / "ab_upt.patc").read_text()
    sizes: dict[str, int | None] = {
        g: args.anchors if g.endswith("anchors") else args.queries
        for g in ("surface_anchors", "surface_queries", "volume_anchors", "volume_queries")
    }
    options = {
        "device": args.device,
        "dtype": args.dtype,
        "dim": args.dim,
        "heads": args.heads,
        "repeat": args.repeat,
    }
    run = measure if args.device.startswith("cuda") else measure_isolated
    cpu = not args.device.startswith("cuda")
    import torch

    print(
        f"MixedAttention executors, AB-UPT layout: 2 x ({args.anchors} anchors + {args.queries} queries) = "
        f"{sum(s or 0 for s in sizes.values())} tokens, dim {args.dim}, {args.heads} heads, batch 1, {args.dtype}, "
        f"{args.device}, torch {torch.__version__}; median of {args.repeat}; ratios vs dense "
        "(speed-up = dense/x, memory = x/dense)"
    )
    header = (
        f"{'pattern':<13} {'executor':<8} {'fwd ms':>9} {'speed-up':>8} {'fwd+bwd ms':>11} {'speed-up':>8} "
        f"{'fwd MB':>8} {'mem':>6} {'fwd+bwd MB':>11} {'mem':>6}"
    )
    print(header)
    print("-" * len(header))
    for pattern in args.patterns:
        results: dict[str, tuple[Measurement, Measurement]] = {}
        for impl in args.implementations:
            fwd = run(source, pattern, sizes, impl, **options)
            bwd = run(source, pattern, sizes, impl, backward=True, **options)
            results[impl] = (fwd, bwd)
        dense = results.get("dense")
        for impl, (fwd, bwd) in results.items():
            base_f = dense[0] if dense else fwd
            base_b = dense[1] if dense else bwd
            note = " (bwd: batched fallback)" if impl == "flex" and cpu else ""
            failed = fwd.error or bwd.error
            if failed:
                print(f"{pattern:<13} {impl:<8} failed: {failed}")
                continue
            print(
                f"{pattern:<13} {impl:<8} {fwd.ms:>9.2f} {_ratio(fwd.ms, base_f.ms, speed=True):>8} "
                f"{bwd.ms:>11.2f} {_ratio(bwd.ms, base_b.ms, speed=True):>8} "
                f"{fwd.peak_mb:>8.0f} {_ratio(fwd.peak_mb, base_f.peak_mb, speed=False):>6} "
                f"{bwd.peak_mb:>11.0f} {_ratio(bwd.peak_mb, base_b.peak_mb, speed=False):>6}{note}"
            )


if __name__ == "__main__":
    main()
