"""Unmasked key blocks on torch's flash-attention kernels, backward included.

A block whose every query may read every key (an AB-UPT branch's anchors,
any call without modifiers) needs no mask. Its forward runs torch's flash
kernel (``aten._scaled_dot_product_flash_attention`` on a GPU, its CPU
counterpart elsewhere), which returns the block's log-sum-exp. Its backward
is the point: the flash backward kernel takes the output and log-sum-exp
the gradient is for, so it is given the *merged* output and log-sum-exp of
all blocks and returns the block's exact share of the gradients of the
whole softmax. No forward is recomputed, where a kernel reached through
autograd (FlexAttention) must run its forward again to rebuild its graph,
a quarter of a block's forward and backward time.

These are the aten operators below ``scaled_dot_product_attention`` that
torch's own context parallel (``torch.distributed.tensor.experimental``)
calls the same way: forward per ring step, backward with the merged output
and log-sum-exp. The GPU kernel needs an NVIDIA GPU of compute capability
8.0 or later, fp16 or bf16, and head sizes that are multiples of 8 up to
256; its backward takes heads wider than 192 on compute capability 8.0 and
9.0 only (:func:`fits`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["backward", "fits", "forward"]

_GPU_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fits(q: Tensor, dim: int) -> bool:
    """Whether torch's flash kernels take ``q`` (``[B, L, H, dim]``)."""
    if q.device.type == "cuda":
        if torch.version.hip is not None or q.dtype not in _GPU_DTYPES or dim % 8 or dim > 256:
            return False
        capability = torch.cuda.get_device_capability(q.device)
        if capability < (8, 0) or (dim > 192 and capability not in ((8, 0), (9, 0))):
            return False
        return bool(torch.backends.cuda.flash_sdp_enabled())  # type: ignore[no-untyped-call,unused-ignore]
    return q.device.type == "cpu" and q.dtype in _CPU_DTYPES


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Output ``[B, Lq, H, D]`` (normalised over this block) and log-sum-exp
    ``[B, H, Lq]`` (float32, float64 for float64 inputs) of ``q`` against
    ``k`` and ``v`` (``[B, Lk, H, D]`` each, views of the packed block);
    ``causal``: query ``i`` reads keys up to ``i`` (``Lq == Lk``)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, causal, False, scale=scale
        )
    else:
        cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = cpu_flash(qt, kt, vt, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """This block's share of the gradients of the merged softmax: ``dq``,
    ``dk``, ``dv`` (``[B, L, H, D]``) from the merged output ``out`` and its
    gradient ``grad`` (``[B, Lq, H, D]``, the queries' dtype) and the merged
    log-sum-exp ``lse`` (``[B, H, Lq]``)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gt, ot = grad.transpose(1, 2), out.transpose(1, 2)
    if q.device.type == "cuda":
        # the random state of dropout: none here, and none read without it
        rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)
        rng_offset = torch.empty((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            gt,
            qt,
            kt,
            vt,
            ot,
            lse.contiguous(),
            None,
            None,
            qt.shape[2],
            kt.shape[2],
            0.0,
            causal,
            rng_state,
            rng_offset,
            scale=scale,
        )
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gt, qt, kt, vt, ot, lse, 0.0, causal, scale=scale
        )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
