"""FlashAttention 4 (the ``flash-attn-4`` package), where it is installed.

Two executors launch it: ``varlen`` through :func:`varlen_attention`, and
``flex`` by asking torch's FlexAttention for it (``kernel_options={"BACKEND":
"FLASH"}``, torch >= 2.10). This module says where its kernels run (Hopper
and Blackwell GPUs, their head sizes) and holds the one switch both follow,
:func:`enabled`.

``varlen``'s kernel is wrapped in two torch custom ops,
``patternc::flash4_varlen`` and ``patternc::flash4_varlen_backward``, with
shape functions and an autograd formula: Dynamo records them as single
nodes instead of tracing FlashAttention 4's launcher (which it cannot), so
a layer inside a user's ``torch.compile`` runs the same kernel as eager.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from patternc.nn.executors.common import device_capability, once

__all__ = ["enabled", "installed", "usable", "varlen_attention"]

_on = True

HEAD_DIM = {9: 256, 10: 128}
"""The largest head size of its kernels per GPU generation it is written
for (compute capability 9: Hopper, 10: Blackwell)."""

Kernels = tuple[Callable[..., Any], Callable[..., Any]]
"""Its forward and backward entry points (``_flash_attn_fwd``,
``_flash_attn_bwd`` of ``flash_attn.cute.interface``): the functions its
own autograd function calls, and torch's FlashAttention-4 registration too."""


@once
def kernels() -> Kernels | None:
    """Its forward and backward entry points, or None where the package is
    not installed or does not import (its CuTe DSL compiler is a separate
    package). Torch's FLASH lowering of FlexAttention imports the same
    module, so this also says whether ``flex`` can ask for it."""
    try:
        from flash_attn.cute import interface  # type: ignore[import-not-found,unused-ignore]

        found = interface._flash_attn_fwd, interface._flash_attn_bwd
    except Exception:  # ImportError, a broken install of its compiler, or a release without them
        return None
    # its compiler warns, on the kernel's internal argument, that it passes the
    # argument as a constant: nothing a user of patternc can act on
    warnings.filterwarnings(
        "ignore", message=r"Argument aux_data .* cannot be converted", category=UserWarning
    )
    return found


def installed() -> bool:
    """The package imports."""
    return kernels() is not None


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Let ``varlen`` and ``flex`` launch FlashAttention 4 where they can (the
    default), or keep them on torch's own kernels (to compare, or to rule
    the package out).

    Example:
        ```python
        from patternc.nn.executors import flash4

        with flash4.enabled(False):
            out, _ = layer(x, sizes)
        ```
    """
    global _on
    previous, _on = _on, on
    try:
        yield
    finally:
        _on = previous


def usable(device: torch.device, head_dim: int) -> bool:
    """Whether its kernels can run here: switched on, the package imports,
    a Hopper or Blackwell GPU, and a head size its kernels take. Eager or
    inside a user's ``torch.compile`` alike (``varlen`` reaches it through
    custom ops)."""
    if not _on or device.type != "cuda" or not installed():
        return False
    return head_dim <= HEAD_DIM.get(device_capability(device)[0], 0)


def _segments(
    cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int, left: int, right: int
) -> dict[str, Any]:
    """The keywords both entry points take for the packed segments and the
    window, ATen's -1 ("unbounded") given as FlashAttention 4's None."""
    return {
        "cu_seqlens_q": cu_seq_q,
        "cu_seqlens_k": cu_seq_k,
        "max_seqlen_q": max_q,
        "max_seqlen_k": max_k,
        "window_size_left": None if left < 0 else left,
        "window_size_right": None if right < 0 else right,
    }


def _require() -> Kernels:
    found = kernels()
    if found is None:
        raise RuntimeError(
            "patternc::flash4_varlen needs the flash-attn-4 package (pip install 'patternc[flash4]')"
        )
    return found


@torch.library.custom_op("patternc::flash4_varlen", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    left: int,
    right: int,
) -> tuple[Tensor, Tensor]:
    """Packed ``[T, H, D]`` attention over segments: ``(out, lse)``, the
    log-sum-exp ``[H, T]`` in float32, kept for the backward."""
    forward, _ = _require()
    out, lse, *_ = forward(
        q,
        k,
        v,
        softmax_scale=scale,
        return_lse=True,
        **_segments(cu_seq_q, cu_seq_k, max_q, max_k, left, right),
    )
    return out.contiguous(), lse.contiguous()


@_forward.register_fake
def _forward_shapes(q: Tensor, k: Tensor, v: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    tokens, heads = q.shape[0], q.shape[1]
    return q.new_empty(tokens, heads, v.shape[-1]), q.new_empty(heads, tokens, dtype=torch.float32)


@torch.library.custom_op("patternc::flash4_varlen_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    left: int,
    right: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Q, K and V for :func:`_forward`."""
    _, backward = _require()
    dq, dk, dv, *_ = backward(
        q,
        k,
        v,
        out,
        grad_out,
        lse,
        scale,
        False,  # causal: given as the window
        0.0,  # softcap
        **_segments(cu_seq_q, cu_seq_k, max_q, max_k, left, right),
    )
    # contiguous, as the shape function says (FlashAttention 4 allocates its
    # gradients like the inputs it was handed, which may be strided views)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_backward_op.register_fake
def _backward_shapes(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, *_: object
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_seq_q, cu_seq_k, *sizes = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seq_q, cu_seq_k)
    ctx.sizes = tuple(sizes)  # max_q, max_k, scale, left, right


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, cu_seq_q, cu_seq_k = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, *ctx.sizes)
    return dq, dk, dv, *(None,) * 7


_forward.register_autograd(_backward, setup_context=_save)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    window: tuple[int, int],
) -> Tensor:
    """Its varlen kernel on packed ``[T, H, D]`` Q/K/V with int32 cumulative
    lengths; ``window``: ``(left, right)`` in ATen's convention (-1:
    unbounded; ``(-1, 0)`` is causal). Differentiable, and one node to
    ``torch.compile``. Raises ``RuntimeError`` without the package.

    Example (two documents of 3 and 5 tokens, each attending to itself):
        ```python
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(8, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = varlen_attention(q, k, v, cu, cu, 5, 5, None, (-1, 0))  # [8, 12, 64]
        ```
    """
    out: Tensor = _forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, *window)[0]
    return out
