"""Block classes of a plan's attention mask, in plain Python (no torch).

What ``patternc compile --mask`` draws and the block sparsity it reports. It
mirrors :mod:`patternc.nn.flexmask` (the torch version FlexAttention uses, and
which the tests check against it): the tokens are cut into blocks of
``block`` queries by ``block`` keys, and each block is *empty* (no pair
allowed: skipped), *full* (every pair allowed: no mask needed) or *partial*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from patternc.lower.layout import Layout
from patternc.modifiers import Modifiers

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockClasses", "block_classes"]

EMPTY, PARTIAL, FULL = 0, 1, 2

_Segment = tuple[str, int, int]  # (group, start, stop)


def _segments(layout: Layout) -> list[_Segment]:
    return [(s.name, s.offset, s.offset + s.size) for s in layout.slots if s.size]


def _block_groups(
    segments: list[_Segment], n_blocks: int, block: int
) -> list[list[tuple[str | None, int, int]]]:
    """For each block: ``(group or None for padding, first pos, last pos)`` of the groups in it."""
    out: list[list[tuple[str | None, int, int]]] = []
    index = 0
    total = segments[-1][2] if segments else 0
    for b in range(n_blocks):
        lo, hi = b * block, (b + 1) * block - 1
        while index < len(segments) and segments[index][2] <= lo:
            index += 1
        parts: list[tuple[str | None, int, int]] = []
        i = index
        while i < len(segments) and segments[i][1] <= hi:
            name, start, stop = segments[i]
            parts.append((name, max(lo, start) - start, min(hi, stop - 1) - start))
            i += 1
        if hi >= total:
            parts.append((None, 0, 0))
        out.append(parts)
    return out


def _pair_class(mods: Modifiers, qlo: int, qhi: int, klo: int, khi: int) -> int:
    """Class of the sub-block of one allowed (query group, key group) pair."""
    full, empty = True, False
    if mods.causal:
        full &= khi <= qlo
        empty |= klo > qhi
    if mods.window is not None:
        full &= max(qhi - klo, khi - qlo) < mods.window
        empty |= klo - qhi >= mods.window or qlo - khi >= mods.window
    if empty:
        return EMPTY
    return FULL if full else PARTIAL


@dataclass(frozen=True)
class BlockClasses:
    """``classes[i][j]`` for query block ``i`` and key block ``j``."""

    classes: tuple[tuple[int, ...], ...]
    block: int
    row_groups: tuple[tuple[str, int], ...]
    """``(group, first block)`` of each query group, for labels."""

    @property
    def counts(self) -> tuple[int, int, int]:
        flat = [c for row in self.classes for c in row]
        return flat.count(EMPTY), flat.count(PARTIAL), flat.count(FULL)

    @property
    def sparsity(self) -> float:
        """Fraction of blocks skipped entirely."""
        empty, partial, full = self.counts
        total = empty + partial + full
        return empty / total if total else 0.0

    def text(self, max_width: int = 64) -> str:
        """Text picture: ``#`` full, ``+`` partial, ``.`` empty; blocks are
        merged into cells (the densest class wins) to fit ``max_width``."""
        rows, cols = len(self.classes), len(self.classes[0]) if self.classes else 0
        step = max(1, math.ceil(cols / max_width))
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        labels = dict((first // step, name) for name, first in self.row_groups)
        width = max((len(n) for n, _ in self.row_groups), default=0)
        lines = []
        for r in range(0, rows, step):
            cells = []
            for c in range(0, cols, step):
                cell = [
                    self.classes[i][j]
                    for i in range(r, min(r + step, rows))
                    for j in range(c, min(c + step, cols))
                ]
                best = (
                    FULL
                    if all(x == FULL for x in cell)
                    else (PARTIAL if any(x != EMPTY for x in cell) else EMPTY)
                )
                cells.append(chars[best])
            lines.append(f"{labels.get(r // step, ''):>{width}} {''.join(cells)}")
        empty, partial, full = self.counts
        scale = f"{self.block * step} x {self.block * step} tokens per cell"
        lines.append(
            f"{'':>{width}} # full {full}, + partial {partial}, . empty {empty} blocks "
            f"(sparsity {self.sparsity:.3f}; {scale})"
        )
        return "\n".join(lines) + "\n"


def block_classes(layout: Layout, block: int = 128) -> BlockClasses:
    """Classify every block of a layout (cached groups excluded: their length
    is only known at run time). Lengths are padded to whole blocks."""
    segments = _segments(layout)
    n_tokens = layout.n_tokens
    n_blocks = max(1, math.ceil(n_tokens / block))
    per_block = _block_groups(segments, n_blocks, block)
    keys = {
        q: {k.name: k.modifiers for k in call.attention.keys}
        for call in layout.calls
        for q in call.query_tokens
    }
    classes = []
    for q_parts in per_block:
        row = []
        for k_parts in per_block:
            nonempty, full = False, True
            for q_group, qlo, qhi in q_parts:
                allowed = keys.get(q_group, {}) if q_group else {}
                for k_group, klo, khi in k_parts:
                    mods = allowed.get(k_group) if k_group else None
                    cls = EMPTY if mods is None else _pair_class(mods, qlo, qhi, klo, khi)
                    nonempty |= cls != EMPTY
                    full &= cls == FULL
            row.append(EMPTY if not nonempty else (FULL if full else PARTIAL))
        classes.append(tuple(row))
    starts = tuple((name, start // block) for name, start, _ in segments)
    return BlockClasses(tuple(classes), block, starts)
