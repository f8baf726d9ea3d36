"""The kernels a ring block could run on, side by side (CUDA).

A context-parallel ring merges each block's softmax by its log-sum-exp, and
its backward hands every block the merged output and log-sum-exp instead of
recomputing it. Any kernel that returns its log-sum-exp and takes one back in
its backward can serve. This compares the two torch ships:
``aten._scaled_dot_product_flash_attention`` (FlashAttention 2, what the ring
runs today) and ``aten._scaled_dot_product_cudnn_attention``:

1. what each returns (shapes, dtypes and strides of the output and the
   log-sum-exp), and the error of the output against a float64 softmax;
2. the merged backward: keys split into two blocks, each block's forward,
   the merge, each block's backward given the merged output and
   log-sum-exp, the summed gradients against float64 autograd;
3. TF/s of forward and backward on ring-sized blocks (bf16, 16 heads of 64),
   median of 20 synchronised calls.

Run: ``python benchmarks/bench_block_kernels.py`` (on a GPU).
"""

from __future__ import annotations

import functools
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten
HEADS, DIM = 16, 64
SCALE = DIM**-0.5


def reference(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Float64 output and log-sum-exp of ``[B, H, L, D]`` inputs."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * SCALE
    if causal:
        rows, cols = scores.shape[-2:]
        allowed = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)


def relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, tuple[Any, ...]]:
    out = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=SCALE)
    return out[0], out[1], tuple(out)


def flash_backward(
    g: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, _: Any
) -> Any:
    rng = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    n_q, n_k = q.shape[2], k.shape[2]
    return aten._scaled_dot_product_flash_attention_backward(
        g, q, k, v, o, lse, None, None, n_q, n_k, 0.0, causal, rng, offset, scale=SCALE
    )


def cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, tuple[Any, ...]]:
    out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=SCALE)
    return out[0], out[1], tuple(out)


def cudnn_backward(
    g: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, extra: Any
) -> Any:
    seed, offset, cum_q, cum_k, max_q, max_k = extra[6], extra[7], extra[2], extra[3], extra[4], extra[5]
    bias = torch.empty(0, device=q.device, dtype=q.dtype)
    return aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, o, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=SCALE
    )


KERNELS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "flash (FlashAttention 2)": (flash_forward, flash_backward),
    "cuDNN": (cudnn_forward, cudnn_backward),
}


def blocks(n_q: int, n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random bf16 Q, K, V ``[1, H, L, D]``, views of ``[1, L, H, D]`` tensors as the ring holds them."""
    return tuple(  # type: ignore[return-value]
        torch.randn(1, n, HEADS, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for n in (n_q, n_k, n_k)
    )


def describe(values: tuple[Any, ...]) -> str:
    parts = []
    for x in values:
        if isinstance(x, Tensor):
            parts.append(f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
        else:
            parts.append(repr(x))
    return "; ".join(parts)


def check(name: str, forward: Callable[..., Any], backward: Callable[..., Any]) -> None:
    """Returns, errors, and the merged backward of one kernel."""
    for n_q, n_k, causal in [(1024, 1024, True), (700, 1500, False)]:
        q, k, v = blocks(n_q, n_k)
        try:
            out, lse, extra = forward(q, k, v, causal)
        except Exception:
            print(f"{name}: forward {n_q} x {n_k} causal={causal} failed:\n{traceback.format_exc(limit=2)}")
            continue
        ref_out, ref_lse = reference(q, k, v, causal)
        print(f"{name}: {n_q} x {n_k} causal={causal}: returns {describe(extra)}")
        print(
            f"    output error {relative(out, ref_out):.2e}, log-sum-exp error {relative(lse.reshape(ref_lse.shape), ref_lse):.2e}"
        )
        if causal:
            continue
        half = n_k // 2
        parts = [(k[:, :, :half], v[:, :, :half]), (k[:, :, half:], v[:, :, half:])]
        runs = [forward(q, kk, vv, False) for kk, vv in parts]
        lses = [r[1].reshape(1, HEADS, n_q).float() for r in runs]
        total = torch.logaddexp(lses[0], lses[1])
        merged = sum(r[0].float() * torch.exp(lse_b - total)[..., None] for r, lse_b in zip(runs, lses))
        assert isinstance(merged, Tensor)
        merged = merged.to(torch.bfloat16)
        grad = torch.randn_like(merged)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        reference(q64, k64, v64, False)[0].backward(grad.double())
        try:
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            dks, dvs = [], []
            for (kk, vv), r in zip(parts, runs):
                lse_in = total.reshape(r[1].shape).contiguous()
                gq, gk, gv = backward(grad, q, kk, vv, merged, lse_in, False, r[2])
                dq += gq.float()
                dks.append(gk)
                dvs.append(gv)
            dk, dv = torch.cat(dks, 2), torch.cat(dvs, 2)
            assert q64.grad is not None and k64.grad is not None and v64.grad is not None
            print(
                f"    merged backward over two key blocks: dq error {relative(dq, q64.grad):.2e}, "
                f"dk {relative(dk, k64.grad):.2e}, dv {relative(dv, v64.grad):.2e}"
            )
        except Exception:
            print(f"    merged backward failed:\n{traceback.format_exc(limit=2)}")


def median_seconds(fn: Callable[[], Any], repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed() -> None:
    print("\n| block | causal | kernel | forward TF/s | backward TF/s |\n| --- | --- | --- | ---: | ---: |")
    for n_q, n_k, causal in [(4096, 4096, False), (8192, 8192, True), (16384, 16384, False)]:
        q, k, v = blocks(n_q, n_k)
        flops = 4 * HEADS * DIM * n_q * n_k * (0.5 if causal else 1.0)
        for name, (forward, backward) in KERNELS.items():
            try:
                out, lse, extra = forward(q, k, v, causal)
                grad = torch.randn_like(out)
                fwd = median_seconds(functools.partial(forward, q, k, v, causal))
                bwd = median_seconds(functools.partial(backward, grad, q, k, v, out, lse, causal, extra))
                print(
                    f"| {n_q} x {n_k} | {causal} | {name} | {flops / fwd / 1e12:.0f} | {2.5 * flops / bwd / 1e12:.0f} |"
                )
            except Exception as error:
                print(f"| {n_q} x {n_k} | {causal} | {name} | failed: {type(error).__name__} | |")


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {HEADS} heads of {DIM}")
    for name, (forward, backward) in KERNELS.items():
        check(name, forward, backward)
    speed()


if __name__ == "__main__":
    main()
