"""One packing per row: a batch whose rows hold different groups or sizes,
run in one call.

``sizes`` is then a list of dicts, one per row of ``x`` (``[B, N_max, ...]``;
a row shorter than ``N_max`` is right-padded). The rows' real tokens are
gathered into one sequence ``[1, sum of the rows' tokens, ...]``, which runs
the plan stacked once per row (:meth:`patternc.Plan.per_row`) through the
ordinary path, so every executor serves it; the output is scattered back to
``[B, N_max, ...]``, zero at the padding.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor

from patternc.lower.rows import row_name
from patternc.nn.context import active

__all__ = ["RowSizes", "Rows", "is_per_row", "rows_of"]

RowSizes = Sequence[Mapping[str, int]]
"""One ``{group: size}`` dict per row of ``x``, each in the plan's group order."""


def is_per_row(sizes: object) -> TypeGuard[RowSizes]:
    """True for a non-empty list or tuple of dicts (one per row); a list of
    ``TokenSpec`` is one layout for every row."""
    return isinstance(sizes, (list, tuple)) and bool(sizes) and isinstance(sizes[0], Mapping)


@dataclass(frozen=True)
class Rows:
    """Where each row's real tokens sit in ``x`` and in the gathered sequence."""

    names: tuple[tuple[str, ...], ...]
    """Each row's groups, in order (the key of :meth:`patternc.Plan.per_row`)."""
    sizes: dict[str, int]
    """The sizes of the stacked plan's groups (``group@row``), rows end to end."""
    index: Tensor
    """Flat positions ``row * N_max + i`` of the real tokens, rows in order."""
    batch: int
    width: int
    """``N_max``: the positions per row of ``x``."""

    def gather(self, t: Tensor) -> Tensor:
        """``[B, N_max, ...]`` -> ``[1, total, ...]``: the real tokens, rows end to end."""
        flat = t.reshape(self.batch * self.width, *t.shape[2:])
        return flat.index_select(0, self.index).unsqueeze(0)

    def scatter(self, t: Tensor) -> Tensor:
        """``[1, total, ...]`` -> ``[B, N_max, ...]``, zeros at the padding."""
        out = t.new_zeros(self.batch * self.width, *t.shape[2:])
        out = out.index_copy(0, self.index, t[0])
        return out.view(self.batch, self.width, *t.shape[2:])

    def gather_mask(self, key_padding_mask: Tensor | None) -> Tensor | None:
        """A key padding mask ``[B, N_max]`` (True: a real token) ->
        ``[1, total]``, checked against ``x``'s rows; None stays None."""
        if key_padding_mask is None:
            return None
        if tuple(key_padding_mask.shape) != (self.batch, self.width) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool [batch, N_max] = {[self.batch, self.width]} (True: a real "
                f"token), got {key_padding_mask.dtype} {list(key_padding_mask.shape)}"
            )
        return self.gather(key_padding_mask)

    def gather_freqs(self, freqs: Tensor) -> Tensor:
        """RoPE frequencies ``[N_max, D/2]`` (the same for every row) or
        ``[B, N_max, D/2]`` -> ``[1, total, D/2]``."""
        if freqs.dim() == 2 and freqs.shape[0] == self.width:
            return freqs.index_select(0, self.index % self.width).unsqueeze(0)
        if freqs.dim() == 3 and tuple(freqs.shape[:2]) == (self.batch, self.width):
            return self.gather(freqs)
        raise ValueError(
            f"RoPE frequencies have shape {tuple(freqs.shape)}; with one sizes dict per row they "
            f"are [N_max={self.width}, head_dim/2] or [batch={self.batch}, {self.width}, head_dim/2], "
            "positions of x's padded rows"
        )


def rows_of(sizes: RowSizes, shape: Sequence[int], device: torch.device, traced: bool = False) -> Rows:
    """The rows of ``x`` (of ``shape``, ``[B, N_max, ...]``) that ``sizes``
    (one dict per row) describe.

    Raises:
        ValueError: ``x`` without a token axis, a list whose length is not
            the batch, a size that is not an integer >= 0 (None, a cached
            group, included), a row holding more tokens than ``N_max``, or a
            call inside ``chunked`` or ``context_parallel``.
    """
    context = active(traced)
    if context.cache is not None or context.sharding is not None:
        raise ValueError(
            "sizes with one dict per row are not supported inside chunked or context_parallel; "
            "run those rows apart, or with one sizes dict for the batch"
        )
    if len(shape) < 2:
        raise ValueError(
            f"x has shape {tuple(shape)}; with one sizes dict per row, x is [batch, N_max, ...]: "
            "each row's tokens from position 0, right-padded to the longest row"
        )
    batch, width = int(shape[0]), int(shape[1])
    if len(sizes) != batch:
        raise ValueError(
            f"sizes has {len(sizes)} dicts (one per row) but x has {batch} rows (shape {tuple(shape)}); "
            "give one sizes dict per row of x"
        )
    names, stacked, parts = [], {}, []
    for row, row_sizes in enumerate(sizes):
        if not isinstance(row_sizes, Mapping):
            raise TypeError(
                f"sizes[{row}] is {type(row_sizes).__name__}; with one sizes dict per row every "
                'row is a {group: size} dict, e.g. [{"image": 256, "text": 40}, {"image": 64, "text": 90}]'
            )
        total = 0
        for group, n in row_sizes.items():
            size = _size(n)
            if size is None:
                raise ValueError(
                    f"sizes[{row}][{group!r}] is {n!r}; with one sizes dict per row every group is in x "
                    "(an integer >= 0: no KV cache), 0 for a group the row lacks"
                )
            stacked[row_name(group, row)] = size
            total += size
        if total > width:
            shown = ", ".join(f"{g}={n}" for g, n in row_sizes.items())
            raise ValueError(
                f"row {row} of sizes holds {total} tokens ({shown}) but x has {width} positions per row "
                f"(shape {tuple(shape)}); pad x to the longest row, N_max >= {total}"
            )
        names.append(tuple(row_sizes))
        parts.append(torch.arange(row * width, row * width + total))
    index = torch.cat(parts).to(device)
    return Rows(tuple(names), stacked, index, batch, width)


def _size(n: Any) -> int | None:
    """``n`` as an int >= 0 (a 0-d integer tensor reads as one), else None."""
    if isinstance(n, bool) or n is None:
        return None
    try:
        value = operator.index(n)
    except TypeError:
        return None
    return value if value >= 0 else None
