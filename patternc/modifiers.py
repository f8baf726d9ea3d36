"""Modifiers: which (query, key) pairs of a group pair are allowed.

A modifier belongs to one (query group, key group) pair. It is written
after a key selector (``text -> image, text[causal]``: only the text keys are
causal) or after the whole rule (``a -> a [causal]``: every key group of the
rule). Every modifier list is one *band on the diagonal*: with ``d`` the key's
position minus the query's,

    allowed  iff  low <= d <= high  and  d % dilation == 0

- ``causal``: ``d <= 0`` (``j <= i``);
- ``window N``: ``|d| < N`` (with ``causal``: ``0 <= i - j < N``, the usual
  causal sliding window);
- ``back L``: ``d >= -L`` (at most ``L`` keys behind the query);
- ``ahead R``: ``d <= R``;
- ``dilate D``: ``d % D == 0`` (every ``D``-th key);
- ``across``: positions are the tokens' places in the whole input (a
  group's offset plus the position within it), not within each group.

Without ``across``, positions count *within each group* from 0: for a group
attending to itself this is ordinary causal / local attention; between two
different groups it aligns their starts (query ``i`` sees the first ``i + 1``
keys of the other group under ``causal``), which is why a rule-level modifier
over several key groups is warned about (W102). With ``across`` the band of a
pair is shifted by the key group's offset minus the query group's
(:func:`pair_shift`), known once sizes are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODIFIER_NAMES",
    "NO_MODIFIERS",
    "UNBOUNDED",
    "Band",
    "Modifiers",
    "Neighbourhood",
    "allowed_pairs",
    "band_allows",
    "pair_band",
]

MODIFIER_NAMES = ("causal", "window", "back", "ahead", "dilate", "across")

UNBOUNDED = 1 << 62
"""A band's open side in device tables (int64), past any position difference."""


@dataclass(frozen=True, slots=True)
class Neighbourhood:
    """Token coordinates on a group's shape and the box each query reads.

    Positions ``0 .. prod(shape) - 1`` within the group are row-major
    coordinates on ``shape`` (the last axis varies fastest). A query at
    coordinate ``q`` on an axis of length ``n`` with size ``s`` reads the keys
    at coordinates ``[lo, lo + width)``:

    - ``near``: ``lo = max(0, q - s)``, up to ``q + s`` (cut at the edges);
    - ``kernel``: ``lo = clamp(q - s // 2, 0, n - s)`` and width ``s``, so the
      window always holds ``s`` keys (shifted inwards at the edges).

    Raises:
        ValueError: ``sizes`` and ``shape`` of different lengths, a size below
            its least (``near`` 0, ``kernel`` 1) or a kernel wider than its axis.
    """

    kind: str
    """``near`` or ``kernel``."""
    shape: tuple[int, ...]
    sizes: tuple[int, ...]
    """Per axis: ``N`` of ``near N``, ``K`` of ``kernel K``."""

    def __post_init__(self) -> None:
        if self.kind not in ("near", "kernel"):
            raise ValueError(f"a neighbourhood is `near` or `kernel`, not `{self.kind}`")
        if len(self.sizes) != len(self.shape):
            raise ValueError(f"{len(self.sizes)} sizes for a shape of {len(self.shape)} axes")
        least = 0 if self.kind == "near" else 1
        for size, length in zip(self.sizes, self.shape):
            if size < least:
                raise ValueError(f"`{self.kind}` must be at least {least}, got {size}")
            if self.kind == "kernel" and size > length:
                raise ValueError(f"`kernel {size}` is wider than an axis of {length}")

    @property
    def n_tokens(self) -> int:
        return math.prod(self.shape)

    def text(self) -> str:
        """``kernel 7`` (one size for every axis) or ``kernel 3 7 7``."""
        same = len(set(self.sizes)) == 1
        return f"{self.kind} {' '.join(map(str, self.sizes[:1] if same else self.sizes))}"

    def strides(self) -> tuple[int, ...]:
        """Row-major strides of the shape (the last axis is 1)."""
        out = [1] * len(self.shape)
        for a in range(len(self.shape) - 2, -1, -1):
            out[a] = out[a + 1] * self.shape[a + 1]
        return tuple(out)

    def box(self, axis: int, at: Any) -> tuple[Any, Any]:
        """Key coordinates ``[lo, hi)`` on ``axis`` for a query at ``at`` (an
        int, or a tensor of them)."""
        n, s = self.shape[axis], self.sizes[axis]
        if self.kind == "near":
            lo = at - s
            hi = at + s + 1
            if isinstance(at, int):
                return max(lo, 0), min(hi, n)
            return lo.clamp(min=0), hi.clamp(max=n)
        lo = at - s // 2
        lo = min(max(lo, 0), n - s) if isinstance(at, int) else lo.clamp(0, n - s)
        return lo, lo + s

    def allows(self, q_pos: Any, k_pos: Any) -> Any:
        """Whether query position ``q_pos`` and key position ``k_pos`` (within
        the group: ints, or tensors that broadcast) pair."""
        ok: Any = None
        for axis, (n, stride) in enumerate(zip(self.shape, self.strides())):
            # the leading axis needs no modulo: positions lie within the group
            q_at = q_pos // stride if axis == 0 else q_pos // stride % n
            k_at = k_pos // stride if axis == 0 else k_pos // stride % n
            lo, hi = self.box(axis, q_at)
            inside = (k_at >= lo) & (k_at < hi)
            ok = inside if ok is None else ok & inside
        return ok

    def _widths(self) -> list[list[int]]:
        """Per axis, the window width of each query coordinate."""
        out = []
        for axis, n in enumerate(self.shape):
            out.append([hi - lo for lo, hi in (self.box(axis, at) for at in range(n))])
        return out

    def pairs(self) -> int:
        """How many (query, key) pairs of the group with itself it allows:
        the product over axes of each axis's window widths summed."""
        return math.prod(sum(w) for w in self._widths())

    def pairs_below(self, n_queries: int) -> int:
        """The pairs of the first ``n_queries`` queries (positions ``0 ..
        n_queries - 1``) with every key: whole slices of the leading axis,
        then the rest of the next slice, axis by axis (O(sum of the shape))."""
        widths = self._widths()
        totals = [sum(w) for w in widths]
        rest, weight, total = min(max(n_queries, 0), self.n_tokens), 1, 0
        for axis, stride in enumerate(self.strides()):
            whole, rest = divmod(rest, stride)
            total += weight * sum(widths[axis][:whole]) * math.prod(totals[axis + 1 :])
            if whole == self.shape[axis] or not rest:
                break
            weight *= widths[axis][whole]
        return total

    def reach(self, lo: int, hi: int) -> tuple[int, int]:
        """The lowest and highest key position any query of positions ``[lo,
        hi]`` may read: the corners of the box the queries' coordinate
        ranges reach on every axis (keys between them may be out of reach)."""
        lowest = highest = 0
        for axis, stride in enumerate(self.strides()):
            first, last = self.coordinate_range(axis, lo, hi)
            lowest += stride * self.box(axis, first)[0]
            highest += stride * (self.box(axis, last)[1] - 1)
        return lowest, highest

    def block_entries(self, block: int) -> int:
        """About how many (query, key) entries a kernel of ``block`` x
        ``block`` tiles computes for the group with itself: per block of
        queries, the key blocks from the lowest position any of them reads
        to the highest (:meth:`reach`). An upper bound where blocks between
        those are empty (far frames)."""
        n = self.n_tokens
        total = 0
        for start in range(0, n, block):
            stop = min(n, start + block) - 1
            lowest, highest = self.reach(start, stop)
            total += (stop - start + 1) * (highest // block - lowest // block + 1) * block
        return min(total, n * n)

    def coordinate_range(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
        """The least and largest coordinate on ``axis`` of positions ``[lo, hi]``."""
        stride, n = self.strides()[axis], self.shape[axis]
        first, last = lo // stride, hi // stride
        if last - first >= n or first % n > last % n:
            return 0, n - 1
        return first % n, last % n

    def cell_class(self, qlo: int, qhi: int, klo: int, khi: int) -> tuple[bool, bool]:
        """``(may be non-empty, full)`` of the rectangle of queries ``[qlo,
        qhi]`` and keys ``[klo, khi]`` (positions within the group). Both
        sides are sound: "empty" and "full" are only said when true. The box
        of a query is monotone in its coordinate, so the keys any query of
        a coordinate range reads span ``[box(least).lo, box(largest).hi)``,
        and those every query reads ``[box(largest).lo, box(least).hi)``."""
        some = full = True
        for axis in range(len(self.shape)):
            q_first, q_last = self.coordinate_range(axis, qlo, qhi)
            k_first, k_last = self.coordinate_range(axis, klo, khi)
            lo_first, hi_first = self.box(axis, q_first)
            lo_last, hi_last = self.box(axis, q_last)
            if k_last < lo_first or k_first >= hi_last:
                some = False
            if not (lo_last <= k_first and k_last < hi_first):
                full = False
        return some, full and some


@dataclass(frozen=True, slots=True)
class Band:
    """The allowed pairs of one (query group, key group) pair in positions
    *within the groups*: query ``i`` and key ``j`` pair iff
    ``low <= j - i <= high`` (None: unbounded on that side) and
    ``(j - i - residue) % dilation == 0``."""

    low: int | None
    high: int | None
    dilation: int = 1
    residue: int = 0
    grid: Neighbourhood | None = None
    """A neighbourhood on the group's shape (then the band is open)."""

    def is_empty(self) -> bool:
        """No difference ``j - i`` at all is allowed (whatever the sizes)."""
        if self.low is None or self.high is None:
            return False
        return _first_multiple(self.low, self.dilation, self.residue) > self.high

    def count_in(self, lo: int, hi: int) -> int:
        """How many allowed differences lie in ``[lo, hi]``."""
        a = lo if self.low is None else max(lo, self.low)
        b = hi if self.high is None else min(hi, self.high)
        if a > b:
            return 0
        d, r = self.dilation, self.residue
        return (b - r) // d - (a - 1 - r) // d

    def cell_class(self, qlo: int, qhi: int, klo: int, khi: int) -> tuple[bool, bool]:
        """``(non-empty, full)`` of the rectangle of queries ``[qlo, qhi]`` and
        keys ``[klo, khi]`` (positions within the groups, bounds included):
        its differences ``j - i`` are exactly the integers of
        ``[klo - qhi, khi - qlo]``, so this is exact (under a neighbourhood:
        see :meth:`Neighbourhood.cell_class`)."""
        if self.grid is not None:
            return self.grid.cell_class(qlo, qhi, klo, khi)
        lo, hi = klo - qhi, khi - qlo
        inside = (self.low is None or lo >= self.low) and (self.high is None or hi <= self.high)
        full = inside and (self.dilation == 1 or (lo == hi and (lo - self.residue) % self.dilation == 0))
        return self.count_in(lo, hi) > 0, full


def _first_multiple(at_least: int, dilation: int, residue: int) -> int:
    """The smallest ``x >= at_least`` with ``(x - residue) % dilation == 0``."""
    return at_least + (residue - at_least) % dilation


@dataclass(frozen=True, slots=True)
class Modifiers:
    """One modifier list, as written (``Modifiers(causal=True, window=256)``).

    The list is kept in a canonical form: ``ahead`` next to ``causal`` says
    nothing more and is dropped, ``ahead 0`` alone is ``causal``, ``dilate
    1`` is no dilation, and ``across`` on a band with no bound and no
    dilation is dropped (it changes nothing). :meth:`band` is what it allows.

    Raises:
        ValueError: an argument out of range, or ``window`` beside ``back``
            or ``ahead`` (the parser reports these as E021 and E023).
    """

    causal: bool = False
    window: int | None = None
    back: int | None = None
    ahead: int | None = None
    dilation: int = 1
    across: bool = False
    grid: Neighbourhood | None = None
    """A neighbourhood on a shaped group (``image[kernel 7]``); alone in its list."""

    def __post_init__(self) -> None:
        if self.grid is not None and (
            self.causal
            or self.window is not None
            or self.back is not None
            or self.ahead is not None
            or self.dilation > 1
            or self.across
        ):
            raise ValueError(f"`{self.grid.text()}` beside a band: a neighbourhood stands alone in its list")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        for name, value in (("back", self.back), ("ahead", self.ahead)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be at least 0, got {value}")
        if self.dilation < 1:
            raise ValueError(f"dilation must be at least 1, got {self.dilation}")
        if self.window is not None and (self.back is not None or self.ahead is not None):
            raise ValueError("window beside back or ahead: use back and ahead alone")
        if self.ahead is not None and (self.causal or self.ahead == 0):
            object.__setattr__(self, "causal", True)
            object.__setattr__(self, "ahead", None)
        if self.across and not self._bounded():
            object.__setattr__(self, "across", False)

    def _bounded(self) -> bool:
        return (
            self.causal
            or self.window is not None
            or self.back is not None
            or self.ahead is not None
            or (self.dilation > 1)
        )

    @property
    def restricts(self) -> bool:
        """Whether these modifiers take any key away (what ``bool`` says; an
        attribute read, which Dynamo before torch 2.13 traces where ``bool``
        on a frozen dataclass breaks the graph)."""
        return self._bounded() or self.grid is not None

    def __bool__(self) -> bool:
        return self.restricts

    @property
    def plain(self) -> bool:
        """Only ``causal`` and ``window`` (what every format has always said)."""
        return (
            self.back is None
            and self.ahead is None
            and self.dilation == 1
            and not self.across
            and self.grid is None
        )

    def band(self) -> tuple[int | None, int | None, int]:
        """``(low, high, dilation)``: the pairs allowed are those with
        ``low <= d <= high`` (None: unbounded) and ``d % dilation == 0``, for
        ``d`` the key's position minus the query's (within groups, or in
        the whole input under ``across``). ``low <= 0 <= high`` always."""
        low: int | None = None
        high: int | None = 0 if self.causal else None
        if self.window is not None:
            low = -(self.window - 1)
            high = 0 if self.causal else self.window - 1
        if self.back is not None:
            low = -self.back
        if self.ahead is not None:
            high = self.ahead
        return low, high, self.dilation

    def parts(self) -> list[str]:
        out = ["causal"] if self.causal else []
        if self.window is not None:
            out.append(f"window {self.window}")
        if self.back is not None:
            out.append(f"back {self.back}")
        if self.ahead is not None:
            out.append(f"ahead {self.ahead}")
        if self.dilation > 1:
            out.append(f"dilate {self.dilation}")
        if self.across:
            out.append("across")
        if self.grid is not None:
            out.append(self.grid.text())
        return out

    def text(self) -> str:
        """``[causal, window 4]`` (empty for no modifiers)."""
        return f"[{', '.join(self.parts())}]" if self else ""

    def to_dict(self) -> dict[str, bool | int | list[int] | None]:
        """``causal`` and ``window`` always; ``back``, ``ahead``,
        ``dilation``, ``across`` and a neighbourhood (``kernel``/``near``
        with its sizes, and ``shape``) only where set (older readers of the
        JSON see the lists they know unchanged)."""
        out: dict[str, bool | int | list[int] | None] = {"causal": self.causal, "window": self.window}
        if self.back is not None:
            out["back"] = self.back
        if self.ahead is not None:
            out["ahead"] = self.ahead
        if self.dilation > 1:
            out["dilation"] = self.dilation
        if self.across:
            out["across"] = True
        if self.grid is not None:
            out[self.grid.kind] = list(self.grid.sizes)
            out["shape"] = list(self.grid.shape)
        return out

    def tighten(self, other: Modifiers) -> Modifiers:
        """Both restrictions: the intersection of the two bands.

        Raises:
            ValueError: one band counts positions ``across`` groups and the
                other within them (their intersection is no single band).
        """
        if not other:
            return self
        if not self:
            return other
        if self.grid is not None or other.grid is not None:
            raise ValueError(
                f"cannot intersect {self.text()} with {other.text()}: a neighbourhood is not a band"
            )
        if self.across != other.across:
            raise ValueError(
                f"cannot intersect {self.text()} with {other.text()}: one counts positions across groups "
                "and the other within each group"
            )
        dilation = math.lcm(self.dilation, other.dilation)
        if self.back is None and self.ahead is None and other.back is None and other.ahead is None:
            windows = [w for w in (self.window, other.window) if w is not None]
            window = min(windows) if windows else None
            return Modifiers(self.causal or other.causal, window, None, None, dilation, self.across)
        (low_a, high_a, _), (low_b, high_b, _) = self.band(), other.band()
        lows = [x for x in (low_a, low_b) if x is not None]
        highs = [x for x in (high_a, high_b) if x is not None]
        low, high = (max(lows) if lows else None), (min(highs) if highs else None)
        return Modifiers(
            causal=high == 0,
            back=None if low is None else -low,
            ahead=high if high else None,
            dilation=dilation,
            across=self.across,
        )


NO_MODIFIERS = Modifiers()


def pair_band(modifiers: Modifiers, shift: int = 0) -> Band:
    """The :class:`Band` of a group pair in positions within its groups.
    ``shift`` is the key group's offset in the input minus the query
    group's; it counts only under ``across``."""
    low, high, dilation = modifiers.band()
    if modifiers.grid is not None:
        return Band(None, None, 1, 0, modifiers.grid)
    if not modifiers.across or not shift:
        return Band(low, high, dilation, 0)
    return Band(
        None if low is None else low - shift,
        None if high is None else high - shift,
        dilation,
        -shift % dilation,
    )


def band_allows(band: Band, q_pos: Any, k_pos: Any) -> Any:
    """Whether query position ``q_pos`` and key position ``k_pos`` (within
    their groups) pair under ``band``: ints, or tensors that broadcast (a
    bool tensor then)."""
    if band.grid is not None:
        return band.grid.allows(q_pos, k_pos)
    d = k_pos - q_pos
    ok = d == d
    if band.low is not None:
        ok = ok & (d >= band.low)
    if band.high is not None:
        ok = ok & (d <= band.high)
    if band.dilation > 1:
        ok = ok & ((d - band.residue) % band.dilation == 0)
    return ok


def _sum_clamped(first: int, count: int, high: int) -> int:
    """``sum(clamp(first + t, 0, high) for t in range(count))`` in O(1)."""
    if count <= 0 or high <= 0:
        return 0
    last = first + count - 1
    total = 0
    # terms in [1, high - 1] rise by one: an arithmetic series
    lo, hi = max(first, 1), min(last, high - 1)
    if lo <= hi:
        total += (lo + hi) * (hi - lo + 1) // 2
    # terms at or above high count high each
    at_top = last - max(first, high) + 1
    if at_top > 0:
        total += at_top * high
    return total


def _pairs_below(n_queries: int, n_keys: int, offset: int) -> int:
    """``#{(i, j) : 0 <= i < n_queries, 0 <= j < n_keys, j <= i + offset}``."""
    return _sum_clamped(offset + 1, n_queries, n_keys)


def allowed_pairs(n_queries: int, n_keys: int, modifiers: Modifiers, shift: int = 0) -> int:
    """How many (query, key) pairs of an ``n_queries x n_keys`` group pair
    ``modifiers`` allow (``shift``: see :func:`pair_band`): exact, so FLOPs
    and density are exact too. O(1), or one step per ``dilation``-th
    diagonal of the pair under ``dilate``."""
    if n_queries <= 0 or n_keys <= 0:
        return 0
    if modifiers.grid is not None:
        # the first n_queries queries against every key: a layout refuses
        # other sizes than the shape's, a rank's shard counts a prefix
        return modifiers.grid.pairs_below(n_queries)
    band = pair_band(modifiers, shift)
    # allowed: i + low <= j <= i + high, differences j - i within [-(n_q - 1), n_k - 1]
    low = -(n_queries - 1) if band.low is None else max(band.low, -(n_queries - 1))
    high = n_keys - 1 if band.high is None else min(band.high, n_keys - 1)
    if low > high:
        return 0
    if band.dilation == 1:
        return _pairs_below(n_queries, n_keys, high) - _pairs_below(n_queries, n_keys, low - 1)
    total = 0
    for diagonal in range(_first_multiple(low, band.dilation, band.residue), high + 1, band.dilation):
        # pairs with j - i == diagonal
        total += min(n_queries, n_keys - diagonal) - max(0, -diagonal)
    return total
