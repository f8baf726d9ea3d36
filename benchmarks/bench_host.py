"""Host time per attention call, executor by executor, and where it goes.

For a cached layout, times ``--calls`` back-to-back calls (host time: no
synchronisation inside the loop, the device queue absorbs the kernels) and
calls with a synchronisation after each (wall time). Rows run interleaved,
round after round, and report medians, so clock drift and warm-up order do
not favour one row. Rows:

- ``ideal``: one ``scaled_dot_product_attention`` per pattern on views of
  ready tensors (the floor of host time: one SDPA dispatch per call);
- each executor on ready Q/K/V;
- ``module ideal``: a layer written by hand (fused QKV ``nn.Linear``, one SDPA
  per pattern on its views, output ``nn.Linear``);
- ``module <executor>``: ``PatternAttention`` with that executor, the same
  layer through patternc (sizes as a dict, the KV cache returned).

Then cProfile tables (own time) of chosen rows. Run on the GPU:

    python benchmarks/bench_host.py [--calls 30] [--rounds 15] [--profile batched flex]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import patternc
from patternc.nn import PatternAttention
from patternc.nn.executors import AttentionInputs, get_executor
from patternc.nn.executors.auto import choose

HEADS, DIM = 12, 64
AB = "examples/ab_upt.patc"
AB_SIZES = {"surface_anchors": 1024, "surface_queries": 4096, "volume_anchors": 1024, "volume_queries": 4096}
LAYOUTS: dict[str, tuple[str, str, dict[str, int]]] = {
    "self-anchor 2x(1k+4k)": (AB, "self_anchor", AB_SIZES),
    "joint 2x(1k+4k)": (AB, "joint", AB_SIZES),
    "16 documents": (
        "groups doc*\ndoc* -> self [causal]",
        "default",
        {f"doc{i}": 512 + 64 * i for i in range(16)},
    ),
}
# Rows run in this order every round. auto follows batched, its usual pick:
# while it ran right after flex, whose compiled path runs much other host
# code, it read 6-9 us above batched, against 1.5 us for its pick alone.
EXECUTORS = ["batched", "auto", "varlen", "flex"]


def _ideal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: patternc.Layout
) -> Callable[[], object]:
    """One SDPA per call on head-major views (slices of one transposed tensor)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    calls = []
    for call in layout.calls:
        if len(call.queries) != 1 or len(call.keys) != 1:  # several segments: copy outside the timing
            qs = torch.cat([qh[:, :, s.start : s.stop] for s in call.queries], 2)
            ks = torch.cat([kh[:, :, s.start : s.stop] for s in call.keys], 2)
            vs = torch.cat([vh[:, :, s.start : s.stop] for s in call.keys], 2)
            calls.append((qs, ks, vs, call.is_causal))
        else:
            (qs,), (ks,) = call.queries, call.keys
            calls.append(
                (
                    qh[:, :, qs.start : qs.stop],
                    kh[:, :, ks.start : ks.stop],
                    vh[:, :, ks.start : ks.stop],
                    call.is_causal,
                )
            )

    def run() -> object:
        return [F.scaled_dot_product_attention(a, b, c, is_causal=causal) for a, b, c, causal in calls]

    return run


def _module_ideal(x: torch.Tensor, layout: patternc.Layout, dtype: torch.dtype) -> Callable[[], object]:
    """The same layer by hand: fused QKV, one SDPA per call on its views, output projection."""
    width = HEADS * DIM
    qkv = torch.nn.Linear(width, 3 * width, device=x.device, dtype=dtype)
    proj = torch.nn.Linear(width, width, device=x.device, dtype=dtype)
    segments = [(c.queries[0], c.keys, c.is_causal) for c in layout.calls if len(c.queries) == 1]

    def run() -> object:
        b, n, _ = x.shape
        q, k, v = qkv(x).view(b, n, 3, HEADS, DIM).unbind(2)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        outs = []
        for qs, keys, causal in segments:
            if len(keys) == 1:
                ks, vs = kh[:, :, keys[0].start : keys[0].stop], vh[:, :, keys[0].start : keys[0].stop]
            else:
                ks = torch.cat([kh[:, :, s.start : s.stop] for s in keys], 2)
                vs = torch.cat([vh[:, :, s.start : s.stop] for s in keys], 2)
            outs.append(
                F.scaled_dot_product_attention(qh[:, :, qs.start : qs.stop], ks, vs, is_causal=causal)
            )
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        return proj(out.transpose(1, 2).reshape(b, n, width))

    return run


def _time(fn: Callable[[], object], calls: int, sync: bool) -> tuple[float, float]:
    """(host seconds per call, synced wall seconds per call)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = max(1, calls // 4)
    for _ in range(n):
        fn()
        if sync:
            torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / n


def _layout(
    name: str,
    source: str,
    pattern: str,
    sizes: dict[str, int],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> list[str]:
    """Print one layout's rows; return its profile tables."""
    sync = device.type == "cuda"
    program = patternc.compile(open(source).read() if source.endswith((".patc", ".pc")) else source)
    plan = program.patterns[pattern]
    layout = plan.bind(list(sizes)).layout(sizes)
    q, k, v = (torch.randn(1, layout.n_tokens, HEADS, DIM, device=device, dtype=dtype) for _ in range(3))
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    x = torch.randn(1, layout.n_tokens, HEADS * DIM, device=device, dtype=dtype)
    rows: dict[str, Callable[[], object]] = {"ideal": _ideal(q, k, v, layout)}
    for executor in EXECUTORS:
        label = executor if executor != "auto" else f"auto ({choose(inputs)})"
        rows[label] = functools.partial(get_executor(executor), inputs)
    rows["module ideal"] = _module_ideal(x, layout, dtype)
    for executor in ("batched", "auto"):
        config = patternc.MixedAttentionConfig(hidden_dim=HEADS * DIM, num_heads=HEADS)
        module = PatternAttention(config, plan, backend=executor).to(device, dtype)  # type: ignore[arg-type]
        rows[f"module {executor}"] = functools.partial(module, x, sizes)
    results: dict[str, list[tuple[float, float]]] = {row: [] for row in rows}
    for fn in rows.values():  # warm-up: compile, build tables
        for _ in range(5):
            fn()
    for _ in range(args.rounds):
        for row, fn in rows.items():
            results[row].append(_time(fn, args.calls, sync))
    ideal_host = statistics.median(h for h, _ in results["ideal"])
    module_ideal_host = statistics.median(h for h, _ in results["module ideal"])
    for row, samples in results.items():
        host = statistics.median(h for h, _ in samples)
        wall = statistics.median(w for _, w in samples)
        base = module_ideal_host if row.startswith("module") else ideal_host
        print(f"| {name} | {row} | {host * 1e6:.1f} | {wall * 1e6:.1f} | {host / base:.2f} |", flush=True)
    profiles = []
    for wanted in args.profile:
        row = next((r for r in rows if r == wanted or r.startswith(wanted + " (")), None)
        if row is None:
            continue
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            rows[row]()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
        body = text.getvalue()
        body = body[body.find("ncalls") :]
        profiles.append(f"\n{row} on {name}, {args.calls} calls, by own time:\n```\n{body.rstrip()}\n```")
    return profiles


def _auto_parts(device: torch.device, dtype: torch.dtype) -> None:
    """``auto``'s own host time, piece by piece, on self-anchor 2x(1k+4k)."""
    from patternc.cache import _compiling
    from patternc.nn.executors.auto import PICKS, _conditions, _key

    source, pattern, sizes = LAYOUTS["self-anchor 2x(1k+4k)"]
    plan = patternc.compile(open(source).read()).patterns[pattern]
    layout = plan.bind(list(sizes)).layout(sizes)
    q, k, v = (torch.randn(1, layout.n_tokens, HEADS, DIM, device=device, dtype=dtype) for _ in range(3))
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    choose(inputs)
    key = _key(inputs)
    parts: dict[str, Callable[[], object]] = {
        "choose(inputs)": functools.partial(choose, inputs),
        "_compiling()": _compiling,
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "tuple(q.shape)": lambda: tuple(q.shape),
        "q.dtype": lambda: q.dtype,
        "q.device": lambda: q.device,
        "_conditions(inputs)": functools.partial(_conditions, inputs),
        "_key(inputs)": functools.partial(_key, inputs),
        "hash(key)": functools.partial(hash, key),
        "PICKS.lookup(key)": functools.partial(PICKS.lookup, key),
    }
    print("\n| auto's pick, piece by piece | us/call |\n| --- | --- |")
    for label, fn in parts.items():
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                fn()
            samples.append((time.perf_counter() - start) / 2000)
        print(f"| {label} | {min(samples) * 1e6:.2f} |")


def _periodic_parts(device: torch.device, dtype: torch.dtype, rounds: int) -> None:
    """``batched``'s one periodic launch on self-anchor 2x(1k+4k) (K/V of the
    key tokens, as the layers hand them over), piece by piece, as single
    calls on an empty queue in shuffled rounds (``bench_paired``'s
    :func:`paired_rounds`): where its host time above one SDPA goes. The
    same SDPA on contiguous head-major copies and on ``batched``'s strided
    views tells whether the views cost SDPA itself host time; the views
    alone are the rest."""
    from bench_paired import paired_rounds, percentile

    from patternc.nn.executors.batched import _back_to_tokens, _periods, run_batched
    from patternc.nn.executors.common import compact_keys

    source, pattern, sizes = LAYOUTS["self-anchor 2x(1k+4k)"]
    plan = patternc.compile(open(source).read()).patterns[pattern]
    layout = plan.bind(list(sizes)).layout(sizes)
    launch, space = layout.periodic_launches[0], layout.key_space
    assert launch is not None and space.periodic[0] is not None
    k_period, k_start = space.periodic[0]
    q, k, v = (torch.randn(1, layout.n_tokens, HEADS, DIM, device=device, dtype=dtype) for _ in range(3))
    k, v = (compact_keys(t, space).contiguous() for t in (k, v))
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None, keys_compact=True)
    count = launch.count

    def views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            _periods(q, count, launch.period, launch.q_start, launch.q_length),
            _periods(k, count, k_period, k_start, launch.k_length),
            _periods(v, count, k_period, k_start, launch.k_length),
        )

    qv, kv, vv = views()
    qc, kc, vc = (t.contiguous() for t in (qv, kv, vv))
    out = F.scaled_dot_product_attention(qv, kv, vv)
    rows: dict[str, Callable[[], object]] = {
        "SDPA on contiguous head-major copies": lambda: F.scaled_dot_product_attention(qc, kc, vc),
        "SDPA on batched's strided views": lambda: F.scaled_dot_product_attention(qv, kv, vv),
        "the three views in": views,
        "the view out": lambda: _back_to_tokens(out, 1, layout.n_tokens),
        "run_batched": functools.partial(run_batched, inputs),
    }
    samples = paired_rounds(rows, rounds)  # (device ms, host us) per single call
    print(
        "\n| batched's periodic launch, self-anchor 2x(1k+4k), single calls | host us (median) | host us (p10) | device ms |"
        "\n| --- | ---: | ---: | ---: |"
    )
    for row, values in samples.items():
        host = [h for _, h in values]
        print(
            f"| {row} | {statistics.median(host):.1f} | {percentile(host, 0.1):.1f} "
            f"| {statistics.median(d for d, _ in values):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--calls", type=int, default=30, help="calls per sample: few enough that the launch queue never fills"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", nargs="*", default=["batched", "flex", "module batched"])
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="only the piece tables (batched's periodic launch, auto's pick)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = device.type == "cuda"
    dtype = torch.bfloat16 if sync else torch.float32
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    print(
        f"{torch.cuda.get_device_name() if sync else 'cpu'}, torch {torch.__version__}, {dtype}, {HEADS} heads x {DIM}"
    )
    if not args.parts_only:
        print(
            "\n| layout | row | host us/call | wall us/call (synced) | host / ideal |\n| --- | --- | --- | --- | --- |"
        )
        profiles: list[str] = []
        for name, (source, pattern, sizes) in LAYOUTS.items():
            profiles += _layout(name, source, pattern, sizes, device, dtype, args)
        print("\n".join(profiles))
    if sync:
        _periodic_parts(device, dtype, rounds=20 * args.rounds)
    _auto_parts(device, dtype)


if __name__ == "__main__":
    main()
