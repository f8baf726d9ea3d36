"""CUDA graphs in one line: a module at fixed group sizes, captured forward and backward.

``torch.cuda.make_graphed_callables`` takes tensors only, and a plan's
sizes are a dict; :func:`graphed` fixes the sizes (a graph replays one
shape anyway) and captures the module with them.

>>> attn = PatternAttention(config, plan).cuda()              # doctest: +SKIP
>>> step = graphed(attn, sizes, torch.randn(2, n, 192, device="cuda", requires_grad=True))  # doctest: +SKIP
>>> out = step(x)                     # replays; out.sum().backward() replays the backward  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FixedSizes", "graphed"]


class FixedSizes(nn.Module):
    """``module(x, sizes)`` as ``module(x)``, first output only (the KV cache
    views are not returned: a graph's outputs are its own buffers)."""

    def __init__(self, module: nn.Module, sizes: Mapping[str, int]) -> None:
        super().__init__()
        self.module, self.sizes = module, dict(sizes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.module(x, self.sizes)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def graphed(
    module: nn.Module, sizes: Mapping[str, int], sample: Tensor, **options: Any
) -> Callable[[Tensor], Tensor]:
    """``module`` (a ``PatternAttention``, a ``Transformer``, anything called as
    ``module(x, sizes)``) captured in CUDA graphs at these sizes and the
    sample's shape; ``options`` go to ``make_graphed_callables`` (e.g.
    ``num_warmup_iters``). Set ``sample.requires_grad`` to capture the backward too."""
    if sample.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors; the sample is on {sample.device}")
    fixed = FixedSizes(module, sizes)
    captured = torch.cuda.make_graphed_callables(fixed, (sample,), **options)
    return captured  # type: ignore[return-value]
