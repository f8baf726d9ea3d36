"""Per-query key intervals on the device, and the ``mask_mod`` that reads them.

:func:`patternc.lower.intervals.query_runs_of_runs` says, per query segment, which
runs of keys its queries read as functions of their positions; here those
become two int32 bounds per query and run, and a ``mask_mod`` that compares
a key's index with them (the cost of a hand-written ``kv_idx <= q_idx``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from patternc.lower.intervals import NO_BOUND, Run
from patternc.nn.flexblocks import host_int64

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
    # With ``t`` a query's index and ``p = t - start`` its position in its
    # segment, a run's bounds are ``lo = min(first + max(p + low, 0), cap)``
    # and ``hi = max(last + min(last_top, p + high), floor)``: that is
    # ``lo = clamp(t + lo_shift, first, cap)`` and ``hi = max(min(t +
    # hi_shift, last + last_top), floor)``, six numbers per segment and run
    # computed here, so the device repeats them per token and does four
    # operations on them.
    cells = [(r, start) for row, start in zip(rows, itertools.accumulate(counts, initial=0)) for r in row]
    values = [
        *(r.first - start + r.low for r, start in cells),
        *(r.first for r, _ in cells),
        *(r.cap for r, _ in cells),
        *(r.last - start + r.high for r, start in cells),
        *(r.last + r.last_top for r, _ in cells),
        *(r.floor for r, _ in cells),
        *counts,
    ]
    # one host-to-device copy: the six values per (segment, run), then the segments' counts
    flat = host_int64(values, traced=torch.compiler.is_compiling()).to(device)
    n_segments = len(rows)
    table = flat[: 6 * n_segments * width].view(6, n_segments, width).transpose(1, 2)  # [6, R, segments]
    per_token = torch.repeat_interleave(table, flat[6 * n_segments * width :], dim=2, output_size=length)
    lo_shift, first, cap, hi_shift, top, floor = per_token  # each [R, length]
    t = torch.arange(length, device=device)
    lo = torch.clamp(t + lo_shift, first, cap)
    hi = torch.maximum(torch.minimum(t + hi_shift, top), floor)
    return torch.stack([lo, hi], dim=1).clamp(-NO_BOUND, NO_BOUND).to(torch.int32)


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
