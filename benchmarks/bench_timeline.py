"""Where a single call's time goes on the GPU: idle gaps and the host work under them.

A single call (no graph, synchronised after) takes longer than its kernels
whenever the GPU waits for the host: before the first kernel, and between
kernels when the host takes longer to issue the next one than the GPU takes
to run the last. This profiles ``--calls`` single calls of ``ideal`` (one SDPA
per pattern on ready tensors, as in ``bench_gpu.py``) and of the executors on
the 10k AB-UPT layouts, forward and forward+backward, and prints per call:

- ``wall``: from the call's start on the host to its last kernel's end;
- ``kernels``: the time the GPU is busy (union of kernels, memsets, copies);
- ``first``: host time before the first kernel starts;
- ``gaps``: the idle time between kernels;

then, for each row, the outermost host ops that ran while the GPU was idle
(summed over calls), which is where host time becomes latency. The profiler
slows every op on the host, so absolute gaps read higher than in
``bench_gpu.py``; rows compare with each other. Chrome traces are written to
``--traces`` (one per row) for a closer look.

Run on the GPU: ``python benchmarks/bench_timeline.py [--calls 5] [--traces DIR]``
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from bench_gpu import DIM, HEADS, LAYOUTS, executor_fn, ideal_fn, random_qkv

from patternc.nn.executors.common import AttentionInputs
from patternc.nn.schedule import schedule_for

_GPU_CATEGORIES = {"kernel", "gpu_memset", "gpu_memcpy"}


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    name: str


@dataclass(frozen=True)
class CallTimes:
    wall: float
    busy: float
    first: float
    gaps: float
    idle_host: dict[str, float]


def _union(spans: Iterable[Span]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], span.end)
        else:
            merged.append([span.start, span.end])
    return [(a, b) for a, b in merged]


def _outermost(spans: list[Span]) -> list[Span]:
    """The host ops not inside another op of the same thread (spans are per thread)."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if out and span.end <= out[-1].end:
            continue
        out.append(span)
    return out


def call_times(start: float, gpu: list[Span], host: list[Span]) -> CallTimes:
    """One call's times from its host start, its GPU spans and its outermost host ops."""
    busy = _union(gpu)
    end = busy[-1][1]
    idle = [(start, busy[0][0])] + [(a[1], b[0]) for a, b in itertools.pairwise(busy)]
    under: dict[str, float] = collections.defaultdict(float)
    for lo, hi in idle:
        for op in host:
            overlap = min(hi, op.end) - max(lo, op.start)
            if overlap > 0:
                under[op.name] += overlap
    return CallTimes(
        wall=end - start,
        busy=sum(b - a for a, b in busy),
        first=busy[0][0] - start,
        gaps=sum(hi - lo for lo, hi in idle[1:]),
        idle_host=dict(under),
    )


def analyse(trace: dict[str, object], marker: str) -> list[CallTimes]:
    """Per-call times from a chrome trace whose calls are wrapped in
    ``record_function(marker + index)``."""
    events = [e for e in trace["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]  # type: ignore[union-attr]
    calls = sorted(  # the host's record: the GPU's copy ("gpu_user_annotation") starts at its first kernel
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(marker)
    )
    gpu = [Span(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in _GPU_CATEGORIES]
    by_thread: dict[object, list[Span]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and not str(e["name"]).startswith(marker):
            by_thread[e["tid"]].append(Span(e["ts"], e["ts"] + e["dur"], e["name"]))
    host = [span for spans in by_thread.values() for span in _outermost(spans)]
    results = []
    bounds = [start for start, _ in calls] + [float("inf")]
    for (start, _), next_start in zip(calls, bounds[1:]):
        mine = [s for s in gpu if start <= s.start < next_start]
        if mine:
            results.append(call_times(start, mine, [h for h in host if start <= h.start < next_start]))
    return results


def profile_row(fn: Callable[[], object], calls: int, trace_path: str | None) -> list[CallTimes]:
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    marker = "timeline call "
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(calls + 1):  # the first call pays the profiler's start-up
            with record_function(f"{marker}{index}"):
                fn()
            torch.cuda.synchronize()
    path = trace_path or "/tmp/bench_timeline_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    if trace_path is None:
        os.remove(path)
    return analyse(trace, marker)[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--traces", help="folder for one chrome trace per row")
    parser.add_argument("--variants", nargs="+", default=["batched", "auto"])
    parser.add_argument("--layouts", nargs="+", default=["self-anchor 2x(1k", "joint 2x(1k"])
    parser.add_argument("--top", type=int, default=6, help="host ops listed per row")
    args = parser.parse_args()
    if args.traces:
        os.makedirs(args.traces, exist_ok=True)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {HEADS} heads x {DIM}, median of {args.calls} calls (us)"
    )
    header = f"{'layout':<30} {'pass':<8} {'row':<10} {'wall':>8} {'kernels':>8} {'first':>8} {'gaps':>8}"
    print(header)
    print("-" * len(header))
    notes = []
    for layout_name in [n for n in LAYOUTS if any(part in n for part in args.layouts)]:
        plan, sizes = LAYOUTS[layout_name]()
        schedule = schedule_for(plan.token_specs(sizes), plan)
        for backward in (False, True):
            q, k, v = random_qkv(schedule.n_tokens, backward=backward)
            inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
            rows = {"ideal": ideal_fn(q, k, v, schedule, backward)}
            rows.update({name: executor_fn(name, inputs, backward) for name in args.variants})
            label_pass = "fwd+bwd" if backward else "fwd"
            for row, fn in rows.items():
                trace = None
                if args.traces:
                    slug = f"{layout_name.split()[1]}_{label_pass}_{row}".replace("+", "_")
                    trace = os.path.join(args.traces, f"timeline_{slug}.json")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    times = profile_row(fn, args.calls, trace)
                med = {
                    f: statistics.median(getattr(t, f) for t in times)
                    for f in ("wall", "busy", "first", "gaps")
                }
                print(
                    f"{layout_name:<30} {label_pass:<8} {row:<10} {med['wall']:>8.1f} {med['busy']:>8.1f} {med['first']:>8.1f} {med['gaps']:>8.1f}",
                    flush=True,
                )
                total: dict[str, float] = collections.defaultdict(float)
                for t in times:
                    for name, us in t.idle_host.items():
                        total[name] += us / len(times)
                top = sorted(total.items(), key=lambda item: -item[1])[: args.top]
                notes.append(
                    f"{layout_name}, {label_pass}, {row}: "
                    + "; ".join(f"{name} {us:.1f}" for name, us in top)
                )
    print("\nHost ops under the GPU's idle time (us per call, outermost op per thread):")
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
