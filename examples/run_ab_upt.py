"""Compile examples/ab_upt.patc and run every pattern through the torch runtime.

For each pattern of the file: print the plan at the given sizes, run a
``PatternAttention`` layer with each executor on random inputs, and compare
it with the dense-mask reference (relative error) and time it. Then show the
KV-cache round trip: anchors cached, only queries in the input.

Run: ``python examples/run_ab_upt.py [--anchors 256 --queries 1024]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import patternc
from patternc.nn import PatternAttention
from patternc.report import format_program

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--anchors", type=int, default=256, help="anchor tokens per branch")
    parser.add_argument("--queries", type=int, default=1024, help="query tokens per branch")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    args = parser.parse_args()

    program = patternc.compile(HERE / "ab_upt.patc")
    sizes = {g: args.anchors if g.endswith("_anchors") else args.queries for g in program.groups}
    print(format_program(program, sizes=sizes, dim=args.dim))

    torch.manual_seed(0)
    n_tokens = sum(sizes.values())
    x = torch.randn(2, n_tokens, args.dim)
    print(f"runtime: batch 2, {n_tokens} tokens, dim {args.dim}, {args.heads} heads")
    print(f"{'pattern':<13} {'executor':<8} {'rel. error vs dense':>20} {'forward ms':>11}")
    for name, plan in program.patterns.items():
        config = patternc.MixedAttentionConfig(
            hidden_dim=args.dim, num_heads=args.heads, implementation="dense"
        )
        reference = PatternAttention(config, plan)
        with torch.no_grad():
            expected, _ = reference(x, sizes)
            for impl in ("dense", "loop", "batched"):
                layer = PatternAttention(config.model_copy(update={"implementation": impl}), plan)
                layer.load_state_dict(reference.state_dict())
                layer(x, sizes)  # first call checks the layout once
                start = time.perf_counter()
                out, _ = layer(x, sizes)
                elapsed = (time.perf_counter() - start) * 1e3
                error = float((out - expected).norm() / expected.norm())
                print(f"{name:<13} {impl:<8} {error:>20.2e} {elapsed:>11.1f}")

    # KV cache: anchors computed once, then reused by a call that holds only queries.
    plan = program.patterns["joint"]
    layer = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=args.dim, num_heads=args.heads), plan)
    with torch.no_grad():
        full, cache = layer(x, sizes)
        assert cache is not None
        cached_sizes = {g: (None if g.endswith("_anchors") else s) for g, s in sizes.items()}
        layout = plan.layout(sizes)
        query_slices = [layout.slot(g) for g in plan.groups if g.endswith("_queries")]
        queries = torch.cat([x[:, s.offset : s.offset + (s.size or 0)] for s in query_slices], dim=1)
        out, _ = layer(queries, cached_sizes, kv_cache=cache)
        expected = torch.cat([full[:, s.offset : s.offset + (s.size or 0)] for s in query_slices], dim=1)
    print(
        f"\nKV cache round trip (joint, anchors cached: {sorted(cache)}): "
        f"max |difference| = {float((out - expected).abs().max()):.2e}"
    )


if __name__ == "__main__":
    main()
