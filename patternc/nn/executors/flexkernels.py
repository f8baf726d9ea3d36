"""Which FlexAttention kernel a call gets, and with which options: the
tiles swept best per dtype, head size and GPU, the precision of float32's
products, and when torch's FLASH backend (FlashAttention 4) takes over from
the Triton kernel. Host queries only; :mod:`patternc.nn.executors.flex` runs
the kernel they choose."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patternc.nn.executors import flash4
from patternc.nn.executors.common import AttentionInputs, device_capability, once

__all__ = [
    "FLASH_OPTIONS",
    "KernelOptions",
    "backward_tiles",
    "flash_backend",
    "float32_products",
    "kernel_options",
]

KernelOptions = dict[str, int | str]
"""FlexAttention ``kernel_options``: tiles, warps, stages, product precision."""


_HALF_KERNEL_OPTIONS: KernelOptions = {
    "fwd_BLOCK_M": 128,
    "fwd_BLOCK_N": 64,
    "fwd_num_warps": 4,
    "fwd_num_stages": 3,
}
"""Forward tile for half precision on CUDA, the best of seven candidate tiles
at head_dim 64 on Hopper GPUs (AB-UPT self-anchor and joint layouts): about
1.4-1.6x the forward rate of torch's default tiles. The ``fwd_`` prefix
keeps these options out of the backward kernels: unprefixed, the warps and
stages reach them too and make forward+backward several times slower.
torch 2.6 knows no prefix: it defines the prefixed names in the kernel
unused, so its own tiles stand there (read off its template code)."""


def backward_tiles(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int) -> KernelOptions:
    """FlexAttention's ``bwd_``-prefixed ``kernel_options`` for these tiles."""
    tiles = {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2, "num_warps": warps}
    return {f"bwd_{key}": value for key, value in {**tiles, "num_stages": stages}.items()}


_HOPPER_BACKWARD_OPTIONS = backward_tiles(64, 64, 64, 64, 4, 3)
"""Backward tiles for half precision, head_dim <= 64, on Hopper (sm_90):
forward+backward 5-20% faster than torch's default backward tiles on AB-UPT
self-anchor and joint layouts (with the forward tile above); 32/128/128/32
ties them on long layouts and is slower on short ones. Tiles matter both
ways (64/128/128/64 with 4 warps runs at a third of the speed), so these
stay on the architecture and head sizes they were chosen for."""

_HOPPER_HALF_OPTIONS = _HALF_KERNEL_OPTIONS | _HOPPER_BACKWARD_OPTIONS


_HOPPER_FLOAT32_TILES: dict[str, KernelOptions] = {
    "'ieee'": backward_tiles(64, 64, 64, 64, 8, 1),
    "'tf32x3'": backward_tiles(32, 32, 32, 32, 4, 2),
    "'tf32'": backward_tiles(32, 32, 32, 32, 4, 2),
}
"""Backward tiles for float32 at head_dim 64 on Hopper, per product
precision (torch's float32 default is 16/16/16/16, 4 warps, 1 stage):
forward+backward about 1.6x faster with IEEE products and 1.7x with
three-TF32 products on an AB-UPT self-anchor layout.
Gradients are bitwise equal to the default tiles'. Plain TF32 takes the
three-TF32 tiles (not swept on its own). Other head sizes keep torch's tiles."""


def _read_float32_products() -> str:
    """The float32 products' precision for the kernel: torch's own choice,
    except that an untouched setting gets three-TF32 products.

    Left to itself, torch's FlexAttention computes float32 products in IEEE
    arithmetic on CUDA cores: forward+backward several times slower than
    SDPA's efficient kernel. ``'tf32x3'`` splits each factor into two
    TF32 halves and sums three tensor-core products: about 2.5x faster
    forward and 3x forward+backward, within 1.1e-6 of the IEEE result (plain TF32:
    2e-3). So it is the default while torch's float32 matmul
    precision is untouched (``torch.backends.cuda.matmul.fp32_precision`` is
    ``'none'``, torch >= 2.9). An explicit ``'ieee'`` (or
    ``torch.set_float32_matmul_precision("highest")``) gets IEEE products and
    an allowed TF32 gets TF32; before torch 2.9 an untouched setting cannot
    be told from an explicit one, so torch's IEEE stands."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None and setting != "none":  # set for CUDA matmuls (asking the generic one would raise)
        return "'ieee'" if setting == "ieee" else "'tf32'"
    highest = torch.get_float32_matmul_precision() == "highest"
    if setting == "none":
        return "'tf32x3'" if highest else "'tf32'"
    return "'ieee'" if highest and not matmul.allow_tf32 else "'tf32'"


# Constants to Dynamo: traced inside a user's torch.compile, these host
# queries run once at trace time (torch's precision getters cannot be
# traced; fullgraph would fail), as torch's own flex reads its precision
# once per compile. Eager calls run them as they are.
_float32_products: Callable[[], str] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call,unused-ignore]
    _read_float32_products
)
_capability: Callable[[torch.device], tuple[int, int]] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call,unused-ignore]
    device_capability
)


def float32_products(device: torch.device) -> str:
    """The precision of flex's float32 products on this CUDA device: IEEE
    before Ampere (no TF32 there), else :func:`_float32_products`."""
    return _float32_products() if _capability(device)[0] >= 8 else "'ieee'"


FLASH_OPTIONS: KernelOptions = {"BACKEND": "FLASH"}
"""torch's FlashAttention-4 lowering of FlexAttention (torch >= 2.10, with
the ``flash-attn-4`` package)."""

_FLASH_MIN_FLOPS = {False: 0.4e12, True: 0.13e12}
"""Useful forward FLOPs of a call above which the FLASH backend beats the
Triton kernel, for inference (False) and training (True), bf16 with 12
heads of 64, single calls: FLASH has about twice Triton's fixed cost per
call and runs 1.3x (forward) to 1.5x (forward and backward) as fast past
it, so it wins on long AB-UPT layouts and loses on short ones. The two
lines cross at these FLOPs."""


@once
def _torch_lowers_flash() -> bool:
    """This torch has FlexAttention's FLASH lowering (>= 2.10)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch._inductor.kernel.flex.flex_flash_attention") is not None
    except ModuleNotFoundError:
        return False


def flash_backend(inputs: AttentionInputs) -> bool:
    """Whether this call runs on FlashAttention 4 (torch's FLASH backend):
    half precision, no key padding or ALiBi (plain masks only, the cases
    measured), where :func:`patternc.nn.executors.flash4.usable` says it
    runs, outside a user's ``torch.compile`` (the FLASH lowering inside a
    user's graph is not measured), and past :data:`_FLASH_MIN_FLOPS` of
    useful work."""
    q = inputs.q
    if (
        q.dtype not in (torch.float16, torch.bfloat16)
        or inputs.key_padding_mask is not None
        or inputs.alibi_slopes is not None
    ):
        return False
    if inputs.layout.tables.traced or not flash4.usable(q.device, q.shape[-1]) or not _torch_lowers_flash():
        return False
    batch, _, heads, dim = q.shape
    flops = 4 * batch * heads * dim * inputs.layout.allowed_entries
    return flops >= _FLASH_MIN_FLOPS[inputs.differentiated]


def kernel_options(q: Tensor) -> KernelOptions | None:
    """The tiles measured best for this dtype, head size and GPU, and float32's
    product precision (None: torch's own everywhere)."""
    if not q.is_cuda or torch.version.hip:
        return None
    hopper = _capability(q.device)[0] == 9
    head_dim = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16):
        if head_dim > 128:
            return None
        return _HOPPER_HALF_OPTIONS if hopper and head_dim <= 64 else _HALF_KERNEL_OPTIONS
    if q.dtype != torch.float32:
        return None
    return _FLOAT32_OPTIONS[float32_products(q.device), hopper and head_dim == 64]


_FLOAT32_OPTIONS: dict[tuple[str, bool], KernelOptions] = {
    (products, tiled): {"FLOAT32_PRECISION": products, **(tiles if tiled else {})}
    for products, tiles in _HOPPER_FLOAT32_TILES.items()
    for tiled in (True, False)
}
"""(product precision, Hopper tiles) -> float32's options: one dict per
choice, so calls hand the compiled graph the same options."""
