"""Measuring a plan on every backend: what ``patternc bench`` runs.

Each measurement builds a ``MixedAttention`` with the backend, runs it on
random inputs (forward, or forward+backward), and reports the median time,
the peak memory and the useful TFLOP/s (only allowed score entries count:
``4 * sum(Nq * Nkv) * heads * head_dim`` per batch element forward, 3.5x that
forward+backward). On CUDA, peak memory is ``torch.cuda.max_memory_allocated``;
on CPU it is the process's resident-set high-water mark above its state before
the first call, so each CPU measurement runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Measurement", "measure", "measure_isolated"]

BACKWARD_FLOP_FACTOR = 3.5
"""Forward+backward attention FLOPs relative to forward (backward ~2.5x forward)."""


@dataclass(frozen=True)
class Measurement:
    backend: str
    ms: float
    peak_mb: float
    tflops: float
    error: str | None = None
    note: str | None = None
    """Why the backend ran as another (its fallback warning), if it did."""


def _rss_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(
    source: str,
    pattern: str,
    sizes: dict[str, int | None],
    backend: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    dim: int = 192,
    heads: int = 3,
    batch: int = 1,
    repeat: int = 10,
    backward: bool = False,
) -> Measurement:
    """Time one backend on one pattern of a pattern file's ``source`` text."""
    import torch

    import patternc
    from patternc.nn import PatternAttention

    plan = patternc.compile(source).patterns[pattern]
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig.model_validate(
        {"hidden_dim": dim, "num_heads": heads, "implementation": backend}
    )
    module = PatternAttention(config, plan).to(device=device, dtype=torch_dtype)
    n_tokens = sum(s or 0 for s in sizes.values())
    x = torch.randn(batch, n_tokens, dim, device=device, dtype=torch_dtype)
    on_cuda = device.startswith("cuda")

    def run() -> None:
        if backward:
            xg = x.detach().requires_grad_()
            module(xg, sizes)[0].float().sum().backward()
        else:
            with torch.no_grad():
                module(x, sizes)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    base = _rss_kb("VmRSS")
    base_cuda = 0
    note = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()  # warm-up: checks, schedules, block masks, compilation
        fallbacks = [str(w.message) for w in caught if "runs as 'batched'" in str(w.message)]
        if fallbacks:
            note = fallbacks[0].split(";")[0].removeprefix(f"implementation={backend!r} ")
        run()
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    except Exception as error:  # report, do not crash the table
        nan = float("nan")
        return Measurement(backend, nan, nan, nan, f"{type(error).__name__}: {error}")
    ms = statistics.median(times) * 1e3
    if on_cuda:
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (_rss_kb("VmHWM") - base) / 1024
    flops = 4 * plan.layout(sizes).score_entries * heads * (dim // heads) * batch
    if backward:
        flops = int(flops * BACKWARD_FLOP_FACTOR)
    label = _row_label(backend, plan, sizes, x, heads, backward)
    return Measurement(label, ms, peak, flops / (ms * 1e-3) / 1e12, note=note)


def _row_label(
    backend: str, plan: Any, sizes: dict[str, int | None], x: Any, heads: int, backward: bool
) -> str:
    """What the table calls a row: the backend, ``auto:`` and the executor it
    picked, and ``[fa4]`` where FlashAttention 4 runs the call."""
    import torch

    from patternc.nn.executors.auto import choose
    from patternc.nn.executors.common import AttentionInputs
    from patternc.nn.schedule import schedule_for

    batch, n, dim = x.shape
    q = torch.empty(batch, n, heads, dim // heads, device=x.device, dtype=x.dtype, requires_grad=backward)
    layout = schedule_for(plan.token_specs(sizes), plan)
    inputs = AttentionInputs(q, q, q, layout, {}, None, 0.0, None)
    with torch.set_grad_enabled(backward):
        name = choose(inputs) if backend == "auto" else backend
        label = f"auto:{name}" if backend == "auto" else name
        return label + ("[fa4]" if _runs_flash4(name, inputs) else "")


def _runs_flash4(executor: str, inputs: Any) -> bool:
    """Whether ``executor`` runs these inputs on FlashAttention 4."""
    from patternc.nn.executors import flex, varlen

    if executor == "varlen":
        return varlen.kernel_of(inputs) == "flash4"
    if executor == "flex":
        return flex.kernel_of(inputs) == "flash"
    return False


def measure_isolated(
    source: str, pattern: str, sizes: dict[str, int | None], backend: str, **options: Any
) -> Measurement:
    """:func:`measure` in a fresh Python process (clean CPU memory high-water mark)."""
    payload = json.dumps(
        {"source": source, "pattern": pattern, "sizes": sizes, "backend": backend, **options}
    )
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "patternc.benchmark"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return Measurement(backend, float("nan"), float("nan"), float("nan"), last)
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def _main() -> None:
    """Worker of :func:`measure_isolated`: arguments as JSON on stdin, result on stdout."""
    args = json.loads(sys.stdin.read())
    result = measure(args.pop("source"), args.pop("pattern"), args.pop("sizes"), args.pop("backend"), **args)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
