"""FlashAttention 4 (the ``flash-attn-4`` package), where it is installed.

Two executors launch it: ``varlen`` calls its varlen function directly, and
``flex`` asks torch's FlexAttention for it (``kernel_options={"BACKEND":
"FLASH"}``, torch >= 2.10). This module says where its kernels run (Hopper
and Blackwell GPUs, their head sizes, outside a user's ``torch.compile``)
and holds the one switch both follow, :func:`enabled`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from patternc.cache import _compiling
from patternc.nn.executors.common import device_capability

__all__ = ["enabled", "usable", "varlen_function"]

_on = True

HEAD_DIM = {9: 256, 10: 128}
"""The largest head size of its kernels per GPU generation it is written
for (compute capability 9: Hopper, 10: Blackwell)."""


@functools.cache
def varlen_function() -> Callable[..., Any] | None:
    """Its varlen function (``flash_attn.cute``), or None where the package is
    not installed or does not import (its CuTe DSL compiler is a separate
    package). Torch's FLASH lowering of FlexAttention imports the same
    module, so this also says whether ``flex`` can ask for it."""
    try:
        from flash_attn.cute import flash_attn_varlen_func  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # ImportError, or a broken install of its compiler
        return None
    # its compiler warns, on the kernel's internal argument, that it passes the
    # argument as a constant: nothing a user of patternc can act on
    warnings.filterwarnings(
        "ignore", message=r"Argument aux_data .* cannot be converted", category=UserWarning
    )
    return flash_attn_varlen_func  # type: ignore[no-any-return]


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
    a Hopper or Blackwell GPU, a head size its kernels take, and not inside
    a user's ``torch.compile`` (its launcher cannot be traced)."""
    if not _on or _compiling() or device.type != "cuda" or varlen_function() is None:
        return False
    return head_dim <= HEAD_DIM.get(device_capability(device)[0], 0)
