"""torch.compile of sharded modules, run on every rank of a gloo group spawned by
tests/test_distributed_compile.py or ``python tests/compile_cases.py`` (the table of
graph breaks in benchmarks/results/).

Each case builds a float64 ``PatternAttention`` on every rank (same seed),
runs it on one process over every token (the reference) and sharded,
compiled with ``torch.compile(backend=...)`` after one eager sharded call,
and returns the relative errors of the compiled output and gradients
(parameter gradients summed over the ranks), and Dynamo's graph breaks: how many, why and
where (the innermost frame of patternc's code, or torch's where the break
has none).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import patternc
from patternc import MixedAttentionConfig
from patternc.distributed import ContextParallel
from patternc.nn import PatternAttention

# mode name -> (source, sizes, ContextParallel options)
MODES: dict[str, tuple[str, dict[str, int], dict[str, Any]]] = {
    "heads": ("groups a b\na -> a [causal]\nb -> a, b", {"a": 13, "b": 7}, {"mode": "heads"}),
    "gather": ("groups a b\na -> a\nb -> a, b", {"a": 6, "b": 17}, {"strategy": "gather"}),
    "ring": ("groups a\na -> a [causal]", {"a": 23}, {"strategy": "ring"}),
    "halo": ("groups a\na -> a [causal, window 4]", {"a": 29}, {"strategy": "halo"}),
    # a two-layer untied Transformer with RoPE: causal documents and gathered anchors
    "stack": (
        "groups doc* anchors queries\ndoc* -> self [causal]\nanchors, queries -> anchors",
        {"doc0": 9, "doc1": 3, "doc2": 14, "anchors": 5, "queries": 40},
        {"mode": "ring"},
    ),
    # the same stack over one causal document on a ring: both layers' calls pass keys
    "stack_ring": ("groups a\na -> a [causal]", {"a": 23}, {"strategy": "ring"}),
    # ALiBi on a ring: the slopes reach the operator as a tensor input
    "stack_ring_alibi": ("groups a\na -> a [causal]", {"a": 23}, {"strategy": "ring"}),
}


def _rel(a: Tensor, b: Tensor) -> float:
    sums = torch.stack([(a - b).square().sum(), b.square().sum()])
    dist.all_reduce(sums)
    return float((sums[0] / sums[1].clamp_min(1e-300)).sqrt())


def _where(reason: Any) -> str:
    """``file:line`` of the innermost patternc frame of a break (torch's frame if none)."""
    stack = list(getattr(reason, "user_stack", []) or [])
    for frame in reversed(stack):
        if "/patternc/" in frame.filename:
            return f"patternc/{frame.filename.split('/patternc/')[-1]}:{frame.lineno}"
    if stack:
        frame = stack[-1]
        return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "?"


def run_mode(mode: str, backend: str, fullgraph: bool = False) -> dict[str, Any]:
    source, sizes, options = MODES[mode]
    torch.manual_seed(0)
    attn: nn.Module
    if mode.startswith("stack"):
        config = patternc.nn.TransformerConfig(
            vocab_size=None, d_model=16, num_heads=2, num_layers=2, d_ff=32, dropout_rate=0.0,
            pos_emb_type="alibi" if mode.endswith("alibi") else "rope", untied=True,
        )  # fmt: skip
        attn = patternc.nn.Transformer(config, patternc.compile(source)).double()
        plan = next(iter(attn.plans.values())).bind(list(sizes))
    else:
        plan = patternc.compile(source).patterns["default"]
        attn = PatternAttention(MixedAttentionConfig(hidden_dim=16, num_heads=2), plan).double()
    cp = ContextParallel(plan, sizes, **options)

    def call(x: Tensor, given: dict[str, int]) -> Tensor:
        out = attn(x, given)
        return out if isinstance(out, Tensor) else out[0]

    n = sum(sizes.values())
    x_full = torch.randn(2, n, 16, dtype=torch.float64)
    probe_full = torch.randn(2, n, 16, dtype=torch.float64)
    probe = cp.shard(probe_full)
    local = cp.local_sizes

    # one process over every token: the reference
    x_one = x_full.clone().requires_grad_(True)
    (call(x_one, sizes) * probe_full).sum().backward()
    assert x_one.grad is not None
    ref_out = cp.shard(call(x_full, sizes).detach())
    ref_dx = cp.shard(x_one.grad)
    ref_dp = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in attn.parameters()]

    def forward(x: Tensor) -> Tensor:
        return call(x, local)

    def grads(fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        attn.zero_grad()
        x = cp.shard(x_full).requires_grad_(True)
        with cp:
            out = fn(x)
        (out * probe).sum().backward()
        assert x.grad is not None
        summed = []
        for p in attn.parameters():  # per rank, as under data parallelism: summed over the ranks
            # (a rank without tokens of an untied type has no gradient for its projection)
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            summed.append(grad)
        return out.detach(), x.grad, summed

    grads(forward)  # an eager sharded call first, which builds the layout's runner
    torch._dynamo.reset()
    result: dict[str, Any] = {"mode": mode, "backend": backend, "fullgraph": fullgraph}
    with cp:
        explained = torch._dynamo.explain(forward)(cp.shard(x_full))
    result["graphs"] = explained.graph_count
    result["breaks"] = explained.graph_break_count
    result["reasons"] = [
        {"reason": str(r.reason).splitlines()[0][:160], "where": _where(r)} for r in explained.break_reasons
    ]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(forward, backend=backend, fullgraph=fullgraph)
    try:
        out, dx, dp = grads(compiled)
    except Exception as error:  # a fullgraph failure is a result of the measurement
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if os.environ.get("PATTERNC_TRACE"):
            traceback.print_exc()
        return result
    counted = torch._dynamo.utils.counters["graph_break"]
    result["counted"] = {str(k).splitlines()[0][:160]: v for k, v in counted.items()}
    result["out"] = _rel(out, ref_out)
    result["grad_x"] = _rel(dx, ref_dx)
    result["grad_params"] = max(
        float((a - b).norm() / b.norm()) for a, b in zip(dp, ref_dp, strict=True) if b.norm() > 0
    )
    return result


def worker(rank: int, world: int, port: int, out_dir: str, runs: list[tuple[str, str, bool]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results: list[dict[str, Any]] = []
    for mode, backend, fullgraph in runs:
        try:
            results.append(run_mode(mode, backend, fullgraph))
        except Exception:  # reported to the caller, which fails on it
            results.append({"mode": mode, "backend": backend, "exception": traceback.format_exc()})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def spawn(
    world: int, runs: list[tuple[str, str, bool]], out_dir: str, port: int
) -> list[list[dict[str, Any]]]:
    """Run ``(mode, backend, fullgraph)`` runs on ``world`` gloo processes; every rank's results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, port, out_dir, runs), nprocs=world, join=True)
    out = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        out.append(json.load(open(path)) if os.path.exists(path) else [])
    return out


def main() -> None:
    import socket

    backends = [a for a in sys.argv[1:] if a not in MODES] or ["eager", "aot_eager"]
    modes = [a for a in sys.argv[1:] if a in MODES] or list(MODES)
    runs = [(m, b, False) for b in backends for m in modes] + [(m, "eager", True) for m in modes]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        results = spawn(2, runs, tmp, port)
    print(f"{'mode':7} {'backend':10} {'fullgraph':9} {'graphs':6} {'breaks':6}  result")
    for r in results[0]:
        if "exception" in r:
            print(f"{r['mode']:7} {r['backend']:10} exception: {r['exception'].splitlines()[-1]}")
            continue
        outcome = r.get("error") or (
            f"out {r['out']:.1e} grad_x {r['grad_x']:.1e} grad_params {r['grad_params']:.1e}"
        )
        print(
            f"{r['mode']:7} {r['backend']:10} {r['fullgraph']!s:9} {r['graphs']:6} {r['breaks']:6}  {outcome}"
        )
    print("\ngraph breaks counted by Dynamo while compiling forward and backward (rank 0)")
    for r in results[0]:
        for reason, count in r.get("counted", {}).items():
            print(f"{r['mode']:7} {r['backend']:10} {count:3}x {reason}")
    print("\nbreak reasons (rank 0, explain of the forward; first run of each mode)")
    seen = set()
    for r in results[0]:
        if r["mode"] in seen or "reasons" not in r:
            continue
        seen.add(r["mode"])
        for item in r["reasons"]:
            print(f"{r['mode']:7} {item['where']:45} {item['reason']}")


if __name__ == "__main__":
    main()
