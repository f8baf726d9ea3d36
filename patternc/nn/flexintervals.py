"""Per-query key intervals on the device, and the ``mask_mod`` that reads them.

:func:`patternc.lower.intervals.query_runs_of_runs` says, per query segment, which
runs of keys its queries read as functions of their positions; here those
become two int32 bounds per query and run, and a ``mask_mod`` that compares
a key's index with them (the cost of a hand-written ``kv_idx <= q_idx``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from patternc.lower.intervals import NO_BOUND, Run

__all__ = ["interval_mask_mod", "interval_tables"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

_EMPTY = Run(first=NO_BOUND, low=0, cap=NO_BOUND, last=-NO_BOUND, last_top=0, high=0, floor=-NO_BOUND)
"""A run that holds no key, for any query: fills segments with fewer runs
than the layout's most, and the padding queries."""


def interval_tables(
    runs: Sequence[Sequence[Run]], sizes: Sequence[int], length: int, device: torch.device
) -> Tensor:
    """``[R, 2, length]`` int32: each query's ``lo`` and ``hi`` per run.

    Args:
        runs: each query segment's runs, in input order (from
            :func:`~patternc.lower.intervals.query_runs_of_runs`).
        sizes: each query segment's number of tokens (consecutive from 0).
        length: the padded query length; queries past the segments read nothing.
        device: where the tables go.
    """
    width = max(1, *(len(r) for r in runs)) if runs else 1
    rows = [[*r, *([_EMPTY] * (width - len(r)))] for r in runs]
    rows.append([_EMPTY] * width)  # the padding queries
    counts = [*sizes, length - sum(sizes)]
    values = [
        v for row in rows for r in row for v in (r.first, r.low, r.cap, r.last, r.last_top, r.high, r.floor)
    ]
    # one host-to-device copy: the runs' fields, then the segments' counts
    flat = torch.tensor(values + counts, dtype=torch.int64).to(device)
    n_fields = len(rows) * width * 7
    fields = flat[:n_fields].view(len(rows), width, 7)  # [segments + 1, R, 7]
    counts_t = flat[n_fields:]
    starts = torch.cumsum(counts_t, 0) - counts_t
    segment = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=length)
    p = (torch.arange(length, device=device) - starts[segment])[:, None]  # [length, 1]
    first, low, cap, last, last_top, high, floor = fields[segment].unbind(-1)  # each [length, R]
    lo = torch.minimum(first + torch.clamp(p + low, min=0), cap)
    hi = torch.maximum(last + torch.minimum(last_top, p + high), floor)
    bounds = torch.stack([lo, hi], dim=0).clamp(-NO_BOUND, NO_BOUND)  # [2, length, R]
    return bounds.permute(2, 0, 1).to(torch.int32).contiguous()


def interval_mask_mod(bounds: Tensor) -> MaskMod:
    """``mask_mod`` true where the key's index lies in one of the query's runs."""
    lo0, hi0 = bounds[0, 0], bounds[0, 1]
    if bounds.shape[0] == 1:

        def one_run(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx >= lo0[q_idx]) & (kv_idx <= hi0[q_idx])

        return one_run
    lo1, hi1 = bounds[1, 0], bounds[1, 1]

    def two_runs(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        first = (kv_idx >= lo0[q_idx]) & (kv_idx <= hi0[q_idx])
        return first | ((kv_idx >= lo1[q_idx]) & (kv_idx <= hi1[q_idx]))

    return two_runs
