"""Kernel choices behind ``varlen`` and ``flex``, side by side in one run (GPU).

1. **varlen kernels** on 64 documents (bench_gpu's layout, bf16): torch's
   ``varlen_attn`` (FlashAttention 2), the same kernel called directly
   (``aten._flash_attention_forward``: no custom-op wrapper), and cuDNN's
   ragged attention (``aten._cudnn_attention_forward`` with cumulative
   lengths), forward and forward+backward, each checked against the first.
2. **flex: executor against its kernel**: ``run_flex`` (padding, the
   non-finite-key guard, slicing) against the compiled ``flex_attention``
   call alone on ready padded tensors with the executor's options, and
   ``run_flex`` without its non-finite guard, bf16
   (10k and 65k AB-UPT tokens, 16 documents) and fp32 (10k), forward and
   forward+backward. (float32 tiles and product precision:
   ``bench_gpu.py --sweep-fp32``.)
3. **flex backends**: ``kernel_options={"BACKEND": ...}`` where this torch has them.
4. **dense SDPA: backend and dispatch** (``--parts sdpa``): the one launch
   ``batched`` makes on the 10k AB-UPT layouts (self-anchor: 2 x 5k queries
   on 1k anchors; joint: 10k queries on 2k anchors), through
   ``F.scaled_dot_product_attention`` (torch's choice, flash only, cuDNN
   only) and through the ATen flash / cuDNN ops directly: host time per
   call (no synchronisation) and single-call latency, forward and
   forward+backward.
5. **documents on padded buckets** (``--parts padded``): 64 documents as
   cuDNN launches over length buckets (documents sorted by length, padded
   to their bucket's longest, padded keys masked) against the varlen
   executor (FlashAttention 2), in useful TF/s.
6. **flex across shape changes** (``--parts shapes``): ``run_flex`` on
   layout after layout in one process, bf16 and fp32, forward and
   forward+backward, with the compiled graphs each row added and Dynamo's
   recompile reasons (logged to stderr): a row that falls to eager
   FlexAttention (recompile limit hit) shows as dense-like time.

7. **flex host time, piece by piece** (``--parts flexhost``): host time
   per call (no synchronisation), single-call and back-to-back times of
   ``run_flex``, the compiled graphs it calls (with and without the value
   guard) on ready padded inputs, and the compiled kernel alone on
   head-major inputs, bf16 forward, on
   the 10k and 65k AB-UPT layouts: where flex's host time goes.
8. **back to back, row against row** (``--parts b2b``): ``ideal``,
   ``batched``, ``auto`` and ``batched`` again as a fourth row, self-anchor
   10k forward+backward, back-to-back times and host time per step: whether
   ``auto``'s back-to-back gap over ``batched`` is its own or the row's.
9. **FlashAttention 4** (``--parts fa4``, where ``flash_attn.cute`` is
   installed): its varlen kernel on 64 and 16 documents against the varlen
   executor (FlashAttention 2), and flex with ``BACKEND="FLASH"`` (torch's
   FlashAttention-4 lowering) against ``run_flex``'s Triton kernel on the
   AB-UPT layouts, forward and forward+backward, bf16, each checked against
   the row it is set against.
10. **joint 10k's key gather** (``--parts gather``): SDPA on ready keys
   against SDPA after ``index_select``, and the ``batched`` executor,
   forward and forward+backward, with the kernels of each.

Run: ``python benchmarks/bench_kernels.py [--repeat 15]``
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DIM, HEADS, LAYOUTS, compiled_kernel, cuda_ms, entries, random_qkv

from patternc.nn.executors.common import AttentionInputs
from patternc.nn.executors.flash4 import enabled as flash4
from patternc.nn.executors.flex import _pad_heads_first, flex_tables, run_flex
from patternc.nn.executors.varlen import _launches, run_varlen
from patternc.nn.schedule import schedule_for


def _schedule(name: str) -> object:
    plan, sizes = LAYOUTS[name]()
    return schedule_for(plan.token_specs(sizes), plan)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _row(label: str, ms: float, flops: float, note: str = "") -> None:
    print(f"{label:<44} {ms:>9.3f} {flops / (ms * 1e-3) / 1e12:>8.0f}  {note}", flush=True)


def _first(fn: Callable[..., tuple[Tensor, ...]], *args: object) -> Tensor:
    return fn(*args)[0]


def _call(fn: Callable[[], Tensor], backward: bool) -> None:
    result = fn()
    if backward:
        result.backward(torch.ones_like(result))


def varlen_kernels(repeat: int) -> None:
    print(f"\n{'64 documents, bf16: varlen kernels':<44} {'ms':>9} {'TFLOP/s':>8}")
    schedule = _schedule("64 documents")
    n = schedule.n_tokens
    useful = 4 * entries(schedule) * HEADS * DIM
    (launch,) = _launches(schedule, 1, torch.device("cuda"))
    for backward in (False, True):
        q, k, v = (
            torch.randn(n, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            for _ in range(3)
        )
        inputs = AttentionInputs(q[None], k[None], v[None], schedule, {}, None, 0.0, None)
        cu, max_len = launch.cu_seq_q, launch.max_q

        flash = torch.ops.aten._flash_attention_forward
        cudnn = torch.ops.aten._cudnn_attention_forward
        variants: dict[str, Callable[[], Tensor]] = {
            "varlen executor": functools.partial(run_varlen, inputs),
            "aten flash varlen, direct": functools.partial(
                _first, flash, q, k, v, cu, cu, max_len, max_len, 0.0, False, False
            ),
            "aten cuDNN ragged": functools.partial(
                _first, cudnn, q, k, v, None, cu, cu, max_len, max_len, backward, 0.0, False, False
            ),
        }
        reference = variants["varlen executor"]().detach()  # [1, n, H, D] or [n, H, D]
        label_pass = "fwd+bwd" if backward else "fwd"
        for label, fn in variants.items():
            try:
                out = fn()
                error = _rel(out.detach(), reference)

                ms = cuda_ms(functools.partial(_call, fn, backward), repeat)
            except Exception as exc:  # a kernel this build lacks: say so, go on
                print(f"{label + ' ' + label_pass:<44} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            _row(f"{label} {label_pass}", ms, useful * (3.5 if backward else 1.0), f"rel diff {error:.1e}")


def _unguarded(inputs: AttentionInputs, backward: bool) -> None:
    """``run_flex`` with the non-finite guard and the re-poisoning taken out
    (what NaN semantics equal to separate calls cost; a measurement only)."""
    from unittest import mock

    from patternc.nn.executors import flex

    with (
        mock.patch.object(flex, "_finite_values", lambda k, v: (v, None)),
        mock.patch.object(flex, "_poison", lambda out, *rest: out),
    ):
        _call(functools.partial(run_flex, inputs), backward)


def flex_overhead(repeat: int) -> None:
    """``run_flex`` against the compiled kernel alone on ready padded
    head-major tensors, with the executor's own ``kernel_options``, forward
    and forward+backward, rows interleaved: what the guard, the padding and
    the layout changes around the kernel cost."""
    from bench_gpu import interleaved_ms

    from patternc.nn.executors.flexkernels import kernel_options

    print(f"\n{'flex: executor against its kernel':<44} {'ms':>9} {'TFLOP/s':>8}")
    flex = compiled_kernel()
    names = [n for n in LAYOUTS if n.startswith("AB-UPT")] + ["16 documents"]
    for name in names:
        schedule = _schedule(name)
        tables = flex_tables(schedule, {}, torch.device("cuda"))
        mask = tables.block_mask()
        for dtype in (torch.bfloat16, torch.float32):
            if dtype == torch.float32 and schedule.n_tokens > 20000:
                continue  # float32 at 65k tokens: minutes for one table
            for backward in (False, True):
                q, k, v = random_qkv(schedule.n_tokens, dtype=dtype, backward=backward)
                inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
                padded = [
                    _pad_heads_first(t.detach(), tables.q_len).requires_grad_(backward) for t in (q, k, v)
                ]
                options = kernel_options(q)

                def kernel(
                    padded: list[Tensor] = padded, options: object = options, mask: object = mask
                ) -> Tensor:
                    return flex(*padded, block_mask=mask, kernel_options=options)  # type: ignore[no-any-return]

                rows = {
                    "run_flex": functools.partial(_call, functools.partial(run_flex, inputs), backward),
                    "run_flex, no guard": functools.partial(_unguarded, inputs, backward),
                    "kernel only": functools.partial(_call, kernel, backward),
                }
                useful = 4 * entries(schedule) * HEADS * DIM * (3.5 if backward else 1.0)
                label = f"{name[:26]} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
                for row, ms in interleaved_ms(rows, repeat).items():
                    if isinstance(ms, Exception):
                        print(f"{label} {row} failed: {type(ms).__name__}: {str(ms)[:100]}")
                        continue
                    _row(f"{label} {row}", ms, useful)
    from torch._dynamo.utils import counters

    print(
        "dynamo counters:",
        {k: dict(v) for k, v in counters.items() if v and k in ("stats", "unimplemented", "graph_break")},
    )


def flex_backends(repeat: int) -> None:
    print(f"\n{'flex BACKEND option, bf16 fwd':<44} {'ms':>9} {'TFLOP/s':>8}")
    flex = compiled_kernel()
    schedule = _schedule("AB-UPT joint 2x(1k+4k)")
    useful = 4 * entries(schedule) * HEADS * DIM
    tables = flex_tables(schedule, {}, torch.device("cuda"))
    mask = tables.block_mask()
    padded = [
        _pad_heads_first(
            torch.randn(1, schedule.n_tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16), tables.q_len
        )
        for _ in range(3)
    ]
    for backend in ("AUTO", "TRITON", "FLASH", "TRITON_DECODE"):
        try:
            ms = cuda_ms(
                lambda b=backend: flex(*padded, block_mask=mask, kernel_options={"BACKEND": b}), repeat
            )
        except Exception as exc:
            print(
                f"{'joint 2x(1k+4k) BACKEND=' + backend:<44} failed: {type(exc).__name__}: {str(exc)[:120]}"
            )
            continue
        _row(f"joint 2x(1k+4k) BACKEND={backend}", ms, useful)


def _host_us(fns: dict[str, Callable[[], object]], calls: int = 30, rounds: int = 15) -> dict[str, float]:
    """Median host time of one call of each row in ``calls`` back-to-back
    calls (no synchronisation inside: the device queue absorbs the kernels),
    rows sampled round by round in a fresh shuffled order (the host's speed
    drifts over a run by more than the differences measured here)."""
    import random
    import statistics
    import time

    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return {name: statistics.median(times) for name, times in samples.items()}


def flex_host(repeat: int) -> None:
    """Where ``run_flex``'s host time goes: the wrapper (padding, tables),
    the guard's operations in the compiled graph, and the compiled kernel
    with Dynamo's guards and Inductor's launches."""
    from bench_gpu import ideal_fn, interleaved_ms

    from patternc.nn.executors import flex, flexkernels

    print(f"\n{'flex host time, bf16 fwd':<44} {'ms':>9} {'TFLOP/s':>8}  b2b ms  host us/call")
    kernel = compiled_kernel()
    names = ["AB-UPT self-anchor 2x(1k+4k)", "AB-UPT joint 2x(1k+4k)", "AB-UPT self-anchor 2x(8k+24k)"]
    for name in names:
        schedule = _schedule(name)
        tables = flex_tables(schedule, {}, torch.device("cuda"))
        mask = tables.block_mask()
        q, k, v = random_qkv(schedule.n_tokens)
        inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
        options = flexkernels.kernel_options(q)
        padded = [flex._pad_tokens(t, tables.q_len) for t in (q, k, v)]
        heads_first = [t.transpose(1, 2) for t in padded]
        guarded, unguarded = flex._compiled(flex._attend), flex._compiled(flex._attend_unguarded)
        rows: dict[str, Callable[[], object]] = {
            "ideal": ideal_fn(q, k, v, schedule, False),  # type: ignore[arg-type]
            "run_flex": functools.partial(run_flex, inputs),
            "guarded graph, padded inputs": functools.partial(
                guarded, *padded, mask, None, None, options, tables.q_group, tables.kv_group, tables.allowed
            ),
            "unguarded graph, padded inputs": functools.partial(
                unguarded, *padded, mask, None, None, options
            ),
            "compiled kernel alone": functools.partial(
                kernel, *heads_first, block_mask=mask, kernel_options=options
            ),
        }
        useful = 4 * entries(schedule) * HEADS * DIM
        single = interleaved_ms(rows, repeat)
        b2b = interleaved_ms(rows, repeat, calls=8)
        hosts = _host_us(rows)
        for row in rows:
            ms, ms_b2b = single[row], b2b[row]
            if isinstance(ms, Exception) or isinstance(ms_b2b, Exception):
                print(f"{name} {row} failed: {ms if isinstance(ms, Exception) else ms_b2b}"[:160])
                continue
            _row(f"{name[7:30]} {row}", ms, useful, f"{ms_b2b:6.3f}  {hosts[row]:7.1f}")


def back_to_back(repeat: int) -> None:
    """``auto`` against ``batched`` back to back, with ``batched`` measured
    twice (a fourth row): a gap between the two ``batched`` rows is the
    measurement's, not ``auto``'s."""
    from bench_gpu import executor_fn, ideal_fn, interleaved_ms

    print(
        f"\n{'back to back, self-anchor 10k bf16 fwd+bwd':<44} {'ms':>9} {'TFLOP/s':>8}  b2b ms  host us/step"
    )
    schedule = _schedule("AB-UPT self-anchor 2x(1k+4k)")
    q, k, v = random_qkv(schedule.n_tokens, backward=True)
    inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
    rows = {
        "ideal": ideal_fn(q, k, v, schedule, True),  # type: ignore[arg-type]
        "batched": executor_fn("batched", inputs, True),
        "auto": executor_fn("auto", inputs, True),
        "batched, again": executor_fn("batched", inputs, True),
    }
    useful = 4 * entries(schedule) * HEADS * DIM * 3.5
    for calls in (8, 32):
        single = interleaved_ms(rows, repeat)
        b2b = interleaved_ms(rows, 2 * repeat, calls=calls)
        hosts = _host_us(rows, calls=calls)
        for row in rows:
            ms, ms_b2b = single[row], b2b[row]
            assert isinstance(ms, float) and isinstance(ms_b2b, float)
            _row(f"{calls} calls: {row}", ms, useful, f"{ms_b2b:6.3f}  {hosts[row]:7.1f}")


def _fa4_graph_capture(attend: Callable[..., object]) -> None:
    """Whether FlashAttention 4's varlen launch captures into a CUDA graph
    and replays to the eager result (the executor keeps FlashAttention 2
    under capture until this says so)."""
    q, k, v = (torch.randn(4096, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 1000, 4096], dtype=torch.int32, device="cuda")

    def call() -> Tensor:
        out = attend(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3096, max_seqlen_k=3096)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]

    try:
        eager = call()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
        print(f"FA4 varlen under CUDA graph capture: replays, rel diff {_rel(captured, eager):.1e}")
    except Exception as exc:
        print(f"FA4 varlen under CUDA graph capture: fails: {type(exc).__name__}: {str(exc)[:200]}")


def _against_fa4(
    label: str,
    executor: Callable[[AttentionInputs], Tensor],
    inputs: AttentionInputs,
    alone: tuple[str, Callable[[], Tensor], Callable[[Tensor], Tensor]],
    useful: float,
    backward: bool,
    repeat: int,
    hosts: bool = False,
) -> None:
    """One row set: ``executor`` on torch's own kernels, on its pick, and
    FlashAttention 4 called alone (``alone``: its row name, the call, and
    how to bring its output to the executor's layout), checked against the
    first and interleaved; the FA4 row notes its error and first-call time."""
    import time

    from bench_gpu import interleaved_ms

    def on_torch(inputs: AttentionInputs = inputs) -> Tensor:
        with flash4(False):
            return executor(inputs)

    name, call, as_executor = alone
    reference = on_torch().detach()
    try:
        start = time.perf_counter()
        error = _rel(as_executor(call().detach()), reference)
        first = time.perf_counter() - start
    except Exception as exc:
        print(f"{label} {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        return
    rows = {
        "executor on torch's kernel": functools.partial(_call, on_torch, backward),
        "executor (its pick)": functools.partial(_call, functools.partial(executor, inputs), backward),
        name: functools.partial(_call, call, backward),
    }
    host = _host_us(rows, calls=10, rounds=5) if hosts else {}
    for row, ms in interleaved_ms(rows, repeat).items():
        if isinstance(ms, Exception):
            print(f"{label} {row} failed: {type(ms).__name__}: {str(ms)[:200]}")
            continue
        notes = [f"host {host[row]:.0f} us/call"] if hosts else []
        notes += [f"rel diff {error:.1e}, first call {first:.1f} s"] if row == name else []
        _row(f"{label} {row}", ms, useful * (3.5 if backward else 1.0), ", ".join(notes))


def fa4_kernels(repeat: int) -> None:
    """FlashAttention 4 where installed: varlen documents and flex's FLASH backend."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:
        print(f"\nFlashAttention 4 is not importable here: {type(exc).__name__}: {exc}")
        return
    print(f"\n{'FlashAttention 4 against the executors, bf16':<44} {'ms':>9} {'TFLOP/s':>8}")
    for name in ("64 documents", "16 documents"):
        schedule = _schedule(name)
        n = schedule.n_tokens
        useful = 4 * entries(schedule) * HEADS * DIM
        (launch,) = _launches(schedule, 1, torch.device("cuda"))
        cu, max_len = launch.cu_seq_q, launch.max_q
        for backward in (False, True):
            q, k, v = (
                torch.randn(n, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                for _ in range(3)
            )
            inputs = AttentionInputs(q[None], k[None], v[None], schedule, {}, None, 0.0, None)

            def fa4(q: Tensor = q, k: Tensor = k, v: Tensor = v, cu: Tensor = cu, m: int = max_len) -> Tensor:
                out = flash_attn_varlen_func(
                    q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m
                )
                return out[0] if isinstance(out, tuple) else out

            label = f"{name} {'fwd+bwd' if backward else 'fwd'}"
            alone = ("FA4 varlen alone", fa4, lambda out: out[None])
            _against_fa4(label, run_varlen, inputs, alone, useful, backward, repeat, hosts=True)
    _fa4_graph_capture(flash_attn_varlen_func)
    from torch.nn.attention.flex_attention import flex_attention

    from patternc.nn.executors.flex import _flash_block_mask
    from patternc.nn.executors.flexkernels import FLASH_OPTIONS

    flash = torch.compile(flex_attention, dynamic=False)
    for name in ("AB-UPT self-anchor 2x(1k+4k)", "AB-UPT self-anchor 2x(8k+24k)", "AB-UPT joint 2x(8k+24k)"):
        schedule = _schedule(name)
        tables = flex_tables(schedule, {}, torch.device("cuda"))
        mask = _flash_block_mask(tables, ("bench_kernels", name))
        useful = 4 * entries(schedule) * HEADS * DIM
        for backward in (False, True):
            q, k, v = random_qkv(schedule.n_tokens, backward=backward)
            inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
            heads_first = [
                _pad_heads_first(t.detach(), tables.q_len).requires_grad_(backward) for t in (q, k, v)
            ]

            def flash_flex(heads_first: list[Tensor] = heads_first, mask: object = mask) -> Tensor:
                return flash(*heads_first, block_mask=mask, kernel_options=FLASH_OPTIONS)  # type: ignore[no-any-return]

            label = f"{name[7:30]} {'fwd+bwd' if backward else 'fwd'}"
            n_tokens = schedule.n_tokens
            alone = (
                "flex BACKEND=FLASH alone",
                flash_flex,
                lambda out, n=n_tokens: out.transpose(1, 2)[:, :n],
            )
            _against_fa4(label, run_flex, inputs, alone, useful, backward, repeat)


def sdpa_dispatch(repeat: int) -> None:
    """One dense launch, several ways in: torch's SDPA choice, SDPA pinned to
    flash or cuDNN, and the two ATen ops called directly; on token-major
    views (``[B, L, H, D]`` transposed: what executors get from a fused QKV
    projection) and on contiguous head-major copies (what ``ideal`` rows
    get). Single-call and back-to-back (8 calls) times, host time."""
    import torch.nn.functional as F
    from bench_gpu import interleaved_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    def flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch._scaled_dot_product_flash_attention(q, k, v)[0]

    def cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch._scaled_dot_product_cudnn_attention(q, k, v, None, q.requires_grad)[0]

    shapes = {"self-anchor 10k: 2x5k on 1k": (2, 5120, 1024), "joint 10k: 10k on 2k": (1, 10240, 2048)}
    print(f"\n{'dense SDPA: backend, dispatch, layout':<44} {'ms':>9} {'TFLOP/s':>8}  b2b ms  host us/call")
    for name, (batch, n_q, n_k) in shapes.items():
        for backward in (False, True):
            token_major = [
                torch.randn(batch, n, HEADS, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for n in (n_q, n_k, n_k)
            ]
            head_major = [t.contiguous() for t in token_major]
            for t in token_major + head_major:
                t.requires_grad_(backward)
            ways: dict[str, tuple[Callable[..., Tensor], list[Tensor]]] = {
                "F.sdpa (torch's choice)": (F.scaled_dot_product_attention, token_major),
                "F.sdpa, head-major": (F.scaled_dot_product_attention, head_major),
                "F.sdpa, flash only": (functools.partial(pinned, SDPBackend.FLASH_ATTENTION), token_major),
                "aten flash op": (flash, token_major),
                "aten cuDNN op": (cudnn, token_major),
                "aten cuDNN op, head-major": (cudnn, head_major),
            }
            reference = F.scaled_dot_product_attention(*token_major).detach()
            rows = {}
            for way, (fn, tensors) in ways.items():
                call = functools.partial(fn, *tensors)
                try:
                    error = _rel(call().detach(), reference)
                except Exception as exc:
                    print(f"{name} {way} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                rows[way] = (functools.partial(_call, call, backward), error)
            useful = 4 * batch * n_q * n_k * HEADS * DIM * (3.5 if backward else 1.0)
            fns = {way: fn for way, (fn, _) in rows.items()}
            single = interleaved_ms(fns, repeat)
            b2b = interleaved_ms(fns, repeat, calls=8)
            hosts = _host_us(fns)
            for way, (_, error) in rows.items():
                ms, ms_b2b, host = single[way], b2b[way], hosts[way]
                if isinstance(ms, Exception) or isinstance(ms_b2b, Exception):
                    print(f"{name} {way} failed: {ms if isinstance(ms, Exception) else ms_b2b}"[:160])
                    continue
                label = f"{name[:12]} {'fwd+bwd' if backward else 'fwd'} {way}"
                _row(label, ms, useful, f"{ms_b2b:6.3f}  {host:7.1f}   rel diff {error:.1e}")


def padded_documents(repeat: int) -> None:
    """64 documents as cuDNN launches over length buckets, against varlen.

    Documents are sorted by length and cut into ``buckets`` runs; each run
    is one ``[n, H, L, D]`` launch padded to its longest document, padded
    keys masked by a ``[n, 1, 1, L]`` boolean mask; one gather in per tensor
    and one gather out. Useful FLOPs count real pairs only."""
    import torch.nn.functional as F
    from bench_gpu import interleaved_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel

    schedule = _schedule("64 documents")
    n = schedule.n_tokens
    useful = 4 * entries(schedule) * HEADS * DIM
    spans = sorted(((c.queries[0].start, c.queries[0].length) for c in schedule.calls), key=lambda s: s[1])
    print(f"\n{'64 documents: padded cuDNN buckets':<44} {'ms':>9} {'TFLOP/s':>8}  padded pairs / real")

    def plan(buckets: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor, float]:
        runs = [spans[i * len(spans) // buckets : (i + 1) * len(spans) // buckets] for i in range(buckets)]
        parts, padded_pairs = [], 0
        flat = 0
        slot = torch.empty(n, dtype=torch.int64)
        for run in runs:
            length = max(size for _, size in run)
            index = torch.zeros(len(run), length, dtype=torch.int64)
            keep = torch.zeros(len(run), length, dtype=torch.bool)
            for row, (start, size) in enumerate(run):
                index[row, :size] = torch.arange(start, start + size)
                index[row, size:] = start
                keep[row, :size] = True
                slot[start : start + size] = flat + row * length + torch.arange(size)
            flat += len(run) * length
            padded_pairs += len(run) * length * length
            parts.append((index.cuda(), keep[:, None, None, :].cuda()))
        real = entries(schedule)
        return parts, slot.cuda(), padded_pairs / real

    for backward in (False, True):
        q, k, v = (
            torch.randn(n, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            for _ in range(3)
        )
        inputs = AttentionInputs(q[None], k[None], v[None], schedule, {}, None, 0.0, None)
        reference = run_varlen(inputs).detach().reshape(n, HEADS, DIM)
        rows: dict[str, Callable[[], object]] = {
            "varlen executor": functools.partial(_call, functools.partial(run_varlen, inputs), backward)
        }
        notes = {"varlen executor": "1.00"}
        for backend, buckets in itertools.product(
            (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION), (4, 8, 16)
        ):
            if backend == SDPBackend.EFFICIENT_ATTENTION and buckets != 8:
                continue
            parts, slot, waste = plan(buckets)

            def run(
                parts: list[tuple[Tensor, Tensor]] = parts,
                slot: Tensor = slot,
                qkv: tuple[Tensor, ...] = (q, k, v),
                backend: SDPBackend = backend,
            ) -> Tensor:
                outs = []
                with sdpa_kernel(backend):
                    for index, keep in parts:
                        qb, kb, vb = (t[index].transpose(1, 2) for t in qkv)  # [n, H, L, D]
                        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep))
                flat = torch.cat([o.transpose(1, 2).reshape(-1, HEADS, DIM) for o in outs])
                return flat[slot]

            label = f"{backend.name.split('_')[0]}, {buckets} buckets"
            try:
                error = _rel(run().detach(), reference)
            except Exception as exc:
                print(f"{label} failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            rows[label] = functools.partial(_call, run, backward)
            notes[label] = f"{waste:.2f}   rel diff {error:.1e}"
        label_pass = "fwd+bwd" if backward else "fwd"
        for label, ms in interleaved_ms(rows, repeat).items():
            if isinstance(ms, Exception):
                print(f"{label} {label_pass} failed: {type(ms).__name__}: {str(ms)[:120]}")
                continue
            _row(f"{label} {label_pass}", ms, useful * (3.5 if backward else 1.0), notes[label])


def flex_shape_changes(repeat: int) -> None:
    from torch._dynamo.utils import counters

    torch._logging.set_logs(recompiles=True)
    print(f"\n{'flex across shape changes, one process':<44} {'ms':>9} {'TFLOP/s':>8}  graphs added")
    order = [
        "AB-UPT self-anchor 2x(1k+4k)",
        "AB-UPT joint 2x(1k+4k)",
        "16 documents",
        "64 documents",
        "AB-UPT self-anchor 2x(1k+4k)",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for backward in (False, True):
            for name in order:
                schedule = _schedule(name)
                q, k, v = random_qkv(schedule.n_tokens, dtype=dtype, backward=backward)
                inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
                graphs = counters["stats"]["unique_graphs"]
                ms = cuda_ms(functools.partial(_call, functools.partial(run_flex, inputs), backward), repeat)
                useful = 4 * entries(schedule) * HEADS * DIM * (3.5 if backward else 1.0)
                label = f"{name[:22]} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
                _row(label, ms, useful, f" {counters['stats']['unique_graphs'] - graphs:+d}")
    print("dynamo counters:", {k: dict(v) for k, v in counters.items() if v and k in ("stats", "frames")})


def _gather_rows(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, backward: bool
) -> dict[str, Callable[[], Tensor]]:
    """The joint launch on keys gathered outside the timing, and after one
    ``index_select`` per tensor (see :func:`key_gather`); then the same from
    one fused ``[1, N, 3, H, D]`` projection (as the layers make Q, K and V),
    gathering K and V apart or as one ``[1, Nk, 2, H, D]`` block (one launch
    each way, a third fewer bytes than gathering all of QKV)."""
    import torch.nn.functional as F

    ready = [t.index_select(1, index).detach().requires_grad_(backward) for t in (k, v)]
    fused = torch.stack([q, k, v], dim=2).detach().requires_grad_(backward)

    def attend(queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        heads = (t.transpose(1, 2) for t in (queries, keys, values))
        return F.scaled_dot_product_attention(*heads).transpose(1, 2)

    def fused_apart() -> Tensor:
        fq, fk, fv = fused.unbind(2)
        return attend(fq, fk.index_select(1, index), fv.index_select(1, index))

    def fused_together() -> Tensor:
        kv = fused[:, :, 1:].index_select(1, index)
        return attend(fused[:, :, 0], kv[:, :, 0], kv[:, :, 1])

    return {
        "SDPA on gathered keys": lambda: attend(q, *ready),
        "index_select + SDPA": lambda: attend(q, k.index_select(1, index), v.index_select(1, index)),
        "fused QKV, K and V apart": fused_apart,
        "fused QKV, K/V as one": fused_together,
    }


def key_gather(repeat: int) -> None:
    """Where joint 10k's gap to ``ideal`` goes: its one launch reads 2k anchor
    keys from two token ranges of 10k. SDPA on keys gathered outside the
    timing (the floor), after one ``index_select`` per tensor (its backward:
    a zeroed input-size gradient and an ``index_add``), and the ``batched``
    executor; bf16, forward and forward+backward, then the kernels of the
    gathered forward+backward (the seventh session read 0.11 ms more GPU time
    back to back for ``batched`` than for ``ideal`` there)."""
    from bench_gpu import executor_fn, interleaved_ms
    from torch.profiler import ProfilerActivity, profile

    print(f"\n{'joint 10k key gather, bf16':<44} {'ms':>9} {'TFLOP/s':>8}  b2b ms  host us/call")
    schedule = _schedule("AB-UPT joint 2x(1k+4k)")
    ranges = schedule.whole_call_keys  # type: ignore[attr-defined]
    index = torch.cat([torch.arange(a, b, device="cuda") for a, b in ranges])
    useful = 4 * entries(schedule) * HEADS * DIM  # type: ignore[arg-type]
    for backward in (False, True):
        q, k, v = random_qkv(schedule.n_tokens, backward=backward)
        rows = _gather_rows(q, k, v, index, backward)
        fns = {name: functools.partial(_call, fn, backward) for name, fn in rows.items()}
        inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)  # type: ignore[arg-type]
        fns["batched executor"] = executor_fn("batched", inputs, backward)
        single = interleaved_ms(fns, repeat)
        b2b = interleaved_ms(fns, repeat, calls=8)
        hosts = _host_us(fns)
        label = "fwd+bwd" if backward else "fwd"
        for name in fns:
            ms, ms_b2b = single[name], b2b[name]
            assert isinstance(ms, float) and isinstance(ms_b2b, float), (ms, ms_b2b)
            _row(
                f"{label} {name}",
                ms,
                useful * (3.5 if backward else 1.0),
                f"{ms_b2b:6.3f}  {hosts[name]:7.1f}",
            )
        if backward:
            for name in fns:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        fns[name]()
                    torch.cuda.synchronize()
                print(f"\n== kernels of {name}, fwd+bwd, 10 steps")
                table = prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=10, max_name_column_width=70
                )
                print(table)


def gather_ways(repeat: int) -> None:
    """Ways to gather joint 10k's anchor keys (two token ranges of a
    token-major ``[1, N, H, D]`` tensor), K and V each, forward only: host
    time per call (back to back, rows interleaved) and GPU time (median of
    ``repeat`` samples of 8 calls back to back), beside one SDPA on ready
    keys for scale."""
    import torch.nn.functional as F
    from bench_gpu import interleaved_ms

    schedule = _schedule("AB-UPT joint 2x(1k+4k)")
    ranges = schedule.whole_call_keys  # type: ignore[attr-defined]
    n = schedule.n_tokens  # type: ignore[attr-defined]
    q, k, v = random_qkv(n)
    index = torch.cat([torch.arange(a, b, device="cuda") for a, b in ranges])
    ready = [t.index_select(1, index).transpose(1, 2) for t in (k, v)]

    def narrows(t: Tensor) -> list[Tensor]:
        return [t.narrow(1, a, b - a) for a, b in ranges]

    rows: dict[str, Callable[[], object]] = {
        "index_select x2": lambda: (k.index_select(1, index), v.index_select(1, index)),
        "aten.index_select x2": lambda: (
            torch.ops.aten.index_select(k, 1, index),
            torch.ops.aten.index_select(v, 1, index),
        ),
        "cat of narrows x2": lambda: (torch.cat(narrows(k), 1), torch.cat(narrows(v), 1)),
        "advanced index x2": lambda: (k[:, index], v[:, index]),
        "index_select on [N, H*D] x2": lambda: (
            k.view(n, HEADS * DIM).index_select(0, index),
            v.view(n, HEADS * DIM).index_select(0, index),
        ),
        "SDPA alone (ready keys)": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), *ready),
    }
    hosts = _host_us(rows)
    gpu = interleaved_ms(rows, repeat, calls=8)
    print(
        f"\n{'joint 10k: gathering K and V, bf16':<44} {'host us/call':>12} {'b2b us/call':>12}  keys {ranges}"
    )
    for name in rows:
        ms = gpu[name]
        assert isinstance(ms, float), ms
        print(f"{name:<44} {hosts[name]:>12.1f} {ms * 1e3:>12.1f}")


_PARTS: dict[str, Callable[[int], None]] = {
    "varlen": varlen_kernels,
    "overhead": flex_overhead,
    "backends": flex_backends,
    "sdpa": sdpa_dispatch,
    "padded": padded_documents,
    "shapes": flex_shape_changes,
    "flexhost": flex_host,
    "b2b": back_to_back,
    "fa4": fa4_kernels,
    "gather": key_gather,
    "gather_ways": gather_ways,
}
"""``--parts`` name -> the part, run in this order."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--parts", nargs="+", default=["varlen", "overhead", "backends"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    )
    for part, run in _PARTS.items():
        if part in args.parts:
            run(args.repeat)


if __name__ == "__main__":
    main()
