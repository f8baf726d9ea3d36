"""Untied (per-token-type) layers against their tied counterparts, at equal FLOPs.

Layouts: 2 types x 5120 tokens (AB-UPT: surface and volume), and 4 types of
uneven sizes (1024, 3072, 4608, 1536 tokens); dim 192, batch 1. For
``UntiedLinear`` (square 192 -> 192 and the QKV shape 192 -> 576) every
internal path runs beside the tied ``nn.Linear``; ``UntiedTransformerBlock``
(3 heads, MLP x4, joint anchor pattern) runs beside ``TransformerBlock``.
Forward and forward+backward medians; ratio = untied / tied time.

Run: ``python benchmarks/bench_untied.py [--repeat 20]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import patternc
from patternc.configs import (
    LinearProjectionConfig,
    TransformerBlockConfig,
    UntiedLinearConfig,
    UntiedTransformerBlockConfig,
)
from patternc.nn import TransformerBlock, UntiedLinear, UntiedTransformerBlock

LAYOUTS = {
    "2 types x 5120": {
        "surface_anchors": 1024,
        "surface_queries": 4096,
        "volume_anchors": 1024,
        "volume_queries": 4096,
    },
    "4 types uneven": {
        "a_anchors": 512,
        "a_queries": 512,
        "b_queries": 3072,
        "c_anchors": 1024,
        "c_queries": 3584,
        "d_queries": 1536,
    },
}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each function, timed in alternation so drift hits all alike."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def compare(
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeat: int
) -> dict[str, tuple[float, float]]:
    """Forward (no grad) and forward+backward medians of each variant; the first is the baseline."""

    def forward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                fn(x)

        return run

    def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            fn(x.detach().requires_grad_()).sum().backward()

        return run

    fwd = interleaved_medians({n: forward(f) for n, f in variants.items()}, repeat)
    bwd = interleaved_medians({n: forward_backward(f) for n, f in variants.items()}, repeat)
    return {name: (fwd[name], bwd[name]) for name in variants}


def print_rows(results: dict[str, tuple[float, float]]) -> None:
    base = next(iter(results.values()))
    for name, (f, b) in results.items():
        print(f"  {name:<34} {f:>8.2f} {f / base[0]:>6.2f} {b:>10.2f} {b / base[1]:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dim", type=int, default=192)
    args = parser.parse_args()
    torch.manual_seed(0)
    dim = args.dim
    print(
        f"untied vs tied, dim {dim}, batch 1, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeat}"
    )
    header = f"  {'variant':<34} {'fwd ms':>8} {'ratio':>6} {'fwd+bwd ms':>10} {'ratio':>6}"
    for layout_name, sizes in LAYOUTS.items():
        n = sum(sizes.values())
        types = list(dict.fromkeys(g.rsplit("_", 1)[0] for g in sizes))
        x = torch.randn(1, n, dim)
        for dout in (dim, 3 * dim):
            print(f"\n{layout_name} ({n} tokens, {len(types)} types): linear {dim} -> {dout}")
            print(header)
            config = UntiedLinearConfig(
                linear_projection=LinearProjectionConfig(input_dim=dim, output_dim=dout), num_types=len(types)
            )
            variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "tied nn.Linear": nn.Linear(dim, dout)
            }
            for path in ("auto", "segments", "per_type", "bmm"):
                layer = UntiedLinear(config, types, path)  # type: ignore[arg-type]
                runs = layer.runs(sizes)
                variants[f"UntiedLinear path={path}"] = lambda t, layer=layer, runs=runs: layer(t, runs)
            print_rows(compare(variants, x, args.repeat))

        program = patternc.compile("groups " + " ".join(sizes) + "\npattern joint { * -> *_anchors }\n")
        plan = program.patterns["joint"]
        specs = plan.token_specs(sizes)
        block_config = TransformerBlockConfig(hidden_dim=dim, num_heads=3)
        print(f"\n{layout_name}: transformer block (3 heads, MLP x4, joint anchor attention)")
        print(header)
        tied_block = TransformerBlock(block_config)
        untied_block = UntiedTransformerBlock(
            UntiedTransformerBlockConfig(transformer_block=block_config, num_types=len(types)),
            program.type_names,
        )
        blocks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "TransformerBlock": functools.partial(tied_block, token_specs=specs, attention_patterns=plan),
            "UntiedTransformerBlock": functools.partial(
                untied_block, token_specs=specs, attention_patterns=plan
            ),
        }
        print_rows(compare(blocks, x, max(5, args.repeat // 2)))


if __name__ == "__main__":
    main()
