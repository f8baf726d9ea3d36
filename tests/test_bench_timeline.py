"""``benchmarks/bench_timeline.py``'s trace analysis on a hand-made trace
(the GPU side of the benchmark needs CUDA; the arithmetic does not)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_timeline


def _event(name: str, start: float, duration: float, category: str, thread: int = 1) -> dict[str, object]:
    return {"ph": "X", "name": name, "ts": start, "dur": duration, "cat": category, "tid": thread}


def _trace() -> dict[str, object]:
    """Two calls. Call 0: the host runs an op for 30 us (an inner op inside
    it), the GPU starts a kernel at 20 us, sits idle from 30 to 45 while the
    host runs a second op, then runs another kernel. Call 1: one kernel.
    Each call's marker also appears on the GPU timeline, starting at its
    first kernel, as torch's profiler writes it."""
    return {
        "traceEvents": [
            _event("timeline call 0", 0, 50, "user_annotation"),
            _event("timeline call 0", 20, 35, "gpu_user_annotation", thread=7),
            _event("aten::first", 0, 30, "cpu_op"),
            _event("aten::inner", 5, 10, "cpu_op"),
            _event("aten::second", 30, 20, "cpu_op"),
            _event("kernel a", 20, 10, "kernel", thread=7),
            _event("kernel b", 45, 10, "kernel", thread=7),
            _event("timeline call 1", 100, 10, "user_annotation"),
            _event("timeline call 1", 105, 10, "gpu_user_annotation", thread=7),
            _event("kernel c", 105, 10, "kernel", thread=7),
            {"ph": "M", "name": "process_name", "ts": 0, "tid": 0},
        ]
    }


def test_calls_are_split_at_the_hosts_markers_only() -> None:
    first, second = bench_timeline.analyse(_trace(), "timeline call ")
    assert first.wall == 55 and first.busy == 20
    assert first.first == 20  # host time before the first kernel: not 0 from the GPU's marker
    assert first.gaps == 15
    assert second.wall == 15 and second.first == 5 and second.gaps == 0


def test_idle_time_is_charged_to_the_outermost_host_ops_running_under_it() -> None:
    first, _ = bench_timeline.analyse(_trace(), "timeline call ")
    assert first.idle_host == pytest.approx({"aten::first": 20.0, "aten::second": 15.0})
