"""Block classes of a plan's attention mask, in plain Python (no torch).

What ``patternc compile --mask`` draws and the block sparsity it reports. It
mirrors :mod:`patternc.nn.flexmask` (the torch version FlexAttention uses, and
which the tests check against it): the tokens are cut into blocks of
``block`` queries by ``block`` keys, and each block is *empty* (no pair
allowed: skipped), *full* (every pair allowed: no mask needed) or *partial*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from patternc.lower.layout import Layout
from patternc.modifiers import Band

__all__ = ["BLOCK_SIZE", "EMPTY", "FULL", "PARTIAL", "BlockClasses", "block_classes"]

EMPTY, PARTIAL, FULL = 0, 1, 2

BLOCK_SIZE = 128
"""FlexAttention's sparse block size (queries and keys): the default grain of
block classes, and of the blocks ``flex`` computes."""

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


def _pair_class(band: Band, qlo: int, qhi: int, klo: int, khi: int) -> int:
    """Class of the sub-block of one allowed (query group, key group) pair
    (positions within the groups, bounds included)."""
    nonempty, full = band.cell_class(qlo, qhi, klo, khi)
    return FULL if full else (PARTIAL if nonempty else EMPTY)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class BlockClasses:
    """``classes[i][j]`` for query block ``i`` and key block ``j``."""

    classes: tuple[tuple[int, ...], ...]
    block: int
    row_groups: tuple[tuple[str, int], ...]
    """``(group, first block)`` of each input group, for labels (keys are the same tokens)."""
    cached_keys: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(group, class per query block)`` of each group read as keys from a KV
    cache: its length is known at run time only, so it is one column, *full*
    where the queries read all of it, *partial* where a modifier limits them."""

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
        merged into cells (the densest class wins) to fit ``max_width``.

        Each group has a letter: rows are labelled with the group's name and
        letter, columns (the same tokens, as keys) with the letter above the
        group's first cell; groups read from a KV cache follow a ``|``, one
        column each."""
        rows, cols = len(self.classes), len(self.classes[0]) if self.classes else 0
        step = max(1, math.ceil(cols / max_width))
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        names = [name for name, _ in self.row_groups] + [name for name, _ in self.cached_keys]
        letter = {name: _LETTERS[i] if i < len(_LETTERS) else "?" for i, name in enumerate(names)}
        starting: dict[int, list[str]] = {}
        for name, first in self.row_groups:
            starting.setdefault(first // step, []).append(name)
        labels = {cell: ", ".join(f"{g} {letter[g]}" for g in group) for cell, group in starting.items()}
        width = max((len(label) for label in labels.values()), default=0)
        n_cells = math.ceil(cols / step)
        header = "".join(letter[starting[c][0]] if c in starting else " " for c in range(n_cells))
        cached_header = " ".join(letter[name] for name, _ in self.cached_keys)
        lines = [(f"{'':>{width}} {header}" + (f" | {cached_header}" if self.cached_keys else "")).rstrip()]
        for r in range(0, rows, step):
            band = self.classes[r : r + step]
            cells = [_merge(x for row in band for x in row[c : c + step]) for c in range(0, cols, step)]
            line = f"{labels.get(r // step, ''):>{width}} {''.join(chars[x] for x in cells)}"
            if self.cached_keys:
                cached = [_merge(per_row[r : r + step]) for _, per_row in self.cached_keys]
                line += " | " + " ".join(chars[x] for x in cached)
            lines.append(line)
        empty, partial, full = self.counts
        scale = f"{self.block * step} x {self.block * step} tokens per cell"
        lines.append(
            f"{'':>{width}} # full {full}, + partial {partial}, . empty {empty} blocks "
            f"(sparsity {self.sparsity:.3f}; {scale})"
        )
        if self.cached_keys:
            listed = ", ".join(f"{letter[name]} {name}" for name, _ in self.cached_keys)
            lines.append(f"{'':>{width}} after |: keys read from the KV cache ({listed}), one column each")
        return "\n".join(lines) + "\n"


def _merge(classes: Iterable[int]) -> int:
    """The class of a cell of several blocks: full or empty if every block is, else partial."""
    seen = set(classes)
    if seen <= {FULL}:
        return FULL if seen else EMPTY
    return EMPTY if seen == {EMPTY} else PARTIAL


def block_classes(layout: Layout, block: int = BLOCK_SIZE) -> BlockClasses:
    """Classify every block of a layout; lengths are padded to whole blocks.
    A group read from a KV cache (its length known at run time only) is one
    column of :attr:`BlockClasses.cached_keys`, apart from the blocks."""
    segments = _segments(layout)
    n_tokens = layout.n_tokens
    n_blocks = max(1, math.ceil(n_tokens / block))
    per_block = _block_groups(segments, n_blocks, block)
    index = {g: i for i, g in enumerate(layout.all_groups)}
    keys = {
        q: {k.name: k.modifiers for k in call.attention.keys}
        for call in layout.calls
        for q in call.query_tokens
    }
    bands: dict[tuple[str, str], Band] = {}

    def band_of(q: str, k: str) -> Band:
        if (q, k) not in bands:
            bands[q, k] = layout.pair_band(index[q], index[k])
        return bands[q, k]

    classes = []
    for q_parts in per_block:
        row = []
        for k_parts in per_block:
            nonempty, full = False, True
            for q_group, qlo, qhi in q_parts:
                allowed = keys.get(q_group, {}) if q_group else {}
                for k_group, klo, khi in k_parts:
                    mods = allowed.get(k_group) if k_group else None
                    if mods is None:
                        cls = EMPTY
                    elif not mods:
                        cls = FULL
                    else:
                        assert q_group is not None and k_group is not None
                        cls = _pair_class(band_of(q_group, k_group), qlo, qhi, klo, khi)
                    nonempty |= cls != EMPTY
                    full &= cls == FULL
            row.append(EMPTY if not nonempty else (FULL if full else PARTIAL))
        classes.append(tuple(row))
    starts = tuple((name, start // block) for name, start, _ in segments)
    cached = []
    for group in layout.cached_groups:
        per_row = []
        for q_parts in per_block:
            modifiers = [keys.get(q, {}).get(group) if q else None for q, _, _ in q_parts]
            per_row.append(_merge(EMPTY if m is None else (PARTIAL if m else FULL) for m in modifiers))
        cached.append((group, tuple(per_row)))
    return BlockClasses(tuple(classes), block, starts, tuple(cached))
