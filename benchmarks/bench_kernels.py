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
4. **flex across shape changes** (``--parts shapes``): ``run_flex`` on
   layout after layout in one process, bf16 and fp32, forward and
   forward+backward, with the compiled graphs each row added and Dynamo's
   recompile reasons (logged to stderr): a row that falls to eager
   FlexAttention (recompile limit hit) shows as dense-like time.

Run: ``python benchmarks/bench_kernels.py [--repeat 15]``
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DIM, HEADS, LAYOUTS, compiled_kernel, cuda_ms, entries

from patternc.nn.executors.common import AttentionInputs
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

    from patternc.nn.executors.flex import _kernel_options

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
                q, k, v = (
                    torch.randn(1, schedule.n_tokens, HEADS, DIM, device="cuda", dtype=dtype).requires_grad_(
                        backward
                    )
                    for _ in range(3)
                )
                inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
                padded = [
                    _pad_heads_first(t.detach(), tables.q_len).requires_grad_(backward) for t in (q, k, v)
                ]
                options = _kernel_options(q)

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
                q, k, v = (
                    torch.randn(1, schedule.n_tokens, HEADS, DIM, device="cuda", dtype=dtype).requires_grad_(
                        backward
                    )
                    for _ in range(3)
                )
                inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
                graphs = counters["stats"]["unique_graphs"]
                ms = cuda_ms(functools.partial(_call, functools.partial(run_flex, inputs), backward), repeat)
                useful = 4 * entries(schedule) * HEADS * DIM * (3.5 if backward else 1.0)
                label = f"{name[:22]} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
                _row(label, ms, useful, f" {counters['stats']['unique_graphs'] - graphs:+d}")
    print("dynamo counters:", {k: dict(v) for k, v in counters.items() if v and k in ("stats", "frames")})


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
    if "varlen" in args.parts:
        varlen_kernels(args.repeat)
    if "overhead" in args.parts:
        flex_overhead(args.repeat)
    if "backends" in args.parts:
        flex_backends(args.repeat)
    if "shapes" in args.parts:
        flex_shape_changes(args.repeat)


if __name__ == "__main__":
    main()
