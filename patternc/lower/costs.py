"""The cost model ``auto`` picks an executor by: predicted times from what
a layout knows.

Torch-free: a layout's tokens, calls, launches, allowed score entries and the
tokens a backend must copy, priced with per-backend launch costs and
attention throughputs measured with ``benchmarks/bench_gpu.py`` (see
``docs/performance.md``), forward alone or forward and backward (each
backend's backward ratio: the ranking can flip, float32 ``flex`` leads
forward and trails forward+backward). The runtime (``nn/executors/auto.py``)
says which backends can run a layout on a device and what ``varlen``'s
launches there would move.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from patternc.lower.blocks import BLOCK_SIZE
from patternc.lower.layout import Layout
from patternc.lower.varlen import varlen_window

__all__ = ["Estimate", "VarlenWork", "Workload", "price"]


@dataclass(frozen=True)
class _Rates:
    launch_s: float  # per kernel launch and its Python
    flops_per_s: float  # attention FLOP/s on the entries it computes (forward)
    backward: float  # forward+backward time over forward time, launches aside
    masked_flops_per_s: float | None = None  # SDPA given an attn_mask (None: as unmasked)
    masked_backward: float | None = None
    windowed_flops_per_s: float | None = None  # the kernel's own sliding window (None: as unbounded)
    windowed_backward: float | None = None
    host_s: float = 0.0  # host time of a forward call, which the device's work hides when longer
    host_training_s: float = 0.0  # the same for forward and backward


# bf16, head_dim 64: forward rates and backward ratios fitted to
# ``benchmarks/bench_gpu.py`` at 2x(8k+24k) AB-UPT tokens and 64 documents
# (figures in docs/performance.md). SDPA given a mask cannot run its flash
# kernel: at 4k-10k tokens (``benchmarks/bench_users.py``'s VLM and prefix-LM
# rows, ``bench_gpu.py``'s dense rows) its forward runs at 20-35 TFLOP/s and
# its backward adds about a third, so a masked call costs 4-5x flex's
# forward over the same rectangle and about as much as flex's backward.
_MASKED_HALF = {"masked_flops_per_s": 25e12, "masked_backward": 1.35}
# varlen's sliding window (FlashAttention 2's local kernel, `window_size`)
# runs at about half its unbounded rate, and its backward adds about twice
# its forward. flex's call has host work (tables, guard, padding, block
# mask) that short kernels wait for and long ones hide, so it is priced as
# a floor under the kernel time: fitted to the causal window's layers,
# where varlen leads at 8k tokens and flex from about 16k forward and 32k
# forward+backward (figures in docs/performance.md).
_HALF = {
    "batched": _Rates(25e-6, 380e12, 3.5, **_MASKED_HALF),
    "varlen": _Rates(40e-6, 290e12, 4.0, windowed_flops_per_s=130e12, windowed_backward=3.0),
    "flex": _Rates(60e-6, 250e12, 3.6, host_s=300e-6, host_training_s=1.5e-3),
    "dense": _Rates(25e-6, 420e12, 3.5, **_MASKED_HALF),
}
# varlen on FlashAttention 4 (see varlen_kernel), 64 documents: about 1.3x
# FlashAttention 2's forward rate, forward+backward about 3x its forward. Its
# launcher is Python (CuTe DSL), so a single call pays host time per launch
# beyond its kernel; the launch cost is fitted where that host time shows
# (10k-token AB-UPT and document layouts), not at 64 documents, where the
# host hides behind the kernel: a smaller value makes auto pick varlen for
# small training layouts that batched runs faster.
_HALF_VARLEN_FLASH4 = _Rates(150e-6, 370e12, 3.0)
# float32, head_dim 64 (AB-UPT 2x(1k+4k), 16 and 64 documents): SDPA's
# efficient kernel, masked or not; flex with three-TF32 products (faster
# forward, backward ratio 4.5-5.3 against batched's 3.8-4.3) or, where torch
# is set to IEEE products, on CUDA cores.
_FLOAT = {
    "batched": _Rates(25e-6, 32e12, 4.0),
    "flex": _Rates(60e-6, 43e12, 4.6),
    "dense": _Rates(25e-6, 32e12, 4.0),
}
_FLOAT_FLEX_IEEE = _Rates(60e-6, 20e12, 7.1)
_COPY_BYTES_PER_S = 1.5e12
# SDPA's flash kernels run one thread block per (batch, head, 128 queries)
# forward, and an SM needs two resident blocks to reach its rate: a launch
# of fewer blocks than two per SM (132 SMs on an H100 or H200) leaves SMs
# idle for its whole length. Block-causal video (16 frames of 1024 tokens,
# 12 heads: 96 blocks per frame's call, 17 calls) ran batched at 3.3 ms
# forward where its entries at the full rate predict 1.6 ms, and flex's
# single launch at 2.3 ms; varlen and flex launch every query at once.
_QUERY_TILE = 128
_BLOCK_SLOTS = 2 * 132


@dataclass(frozen=True)
class Estimate:
    """A backend and its predicted seconds for a call."""

    backend: str
    seconds: float


def _fill(layout: Layout, rows: int) -> list[float]:
    """Per call: the fraction of the GPU its batched launch keeps busy
    (``rows``: batch times heads), see :data:`_BLOCK_SLOTS`."""
    fill = [1.0] * len(layout.calls)
    for launch in layout.launches:
        tiles = -(-layout.calls[launch[0]].n_queries // _QUERY_TILE)
        share = min(1.0, max(rows, 1) * len(launch) * tiles / _BLOCK_SLOTS)  # a batch of 0: no work
        for index in launch:
            fill[index] = share
    return fill


def _entries(layout: Layout, compact: bool = False, rows: int = 1) -> tuple[int, float, float, int, int]:
    """(allowed score entries; entries SDPA computes under batched without a
    mask and with one, each divided by its launch's share of the GPU
    (:func:`_fill`, ``rows``: batch times heads); dense entries; tokens the
    batched executor copies); ``compact``: K/V come in the key space, where
    a call's key segments may lie end to end."""
    allowed = 0
    plain = 0.0
    masked = 0.0
    copied = 0
    space = layout.key_space
    fill = _fill(layout, rows)
    for call in layout.calls:
        input_keys = [s for s in call.keys if s.cached is None and s.length]
        n_kv = sum(s.length for s in input_keys)
        allowed += call.allowed_entries
        share = fill[call.index]
        if call.is_causal:  # SDPA's is_causal: no mask, the masked half skipped
            plain += call.allowed_entries / share
        elif call.has_modifiers:  # a mask: the whole rectangle, on SDPA's masked kernel
            masked += call.n_queries * n_kv / share
        else:
            plain += call.n_queries * n_kv / share
        if len(call.queries) > 1:
            copied += call.n_queries
        end_to_end = compact and all(
            space.position(a.stop) == space.position(b.start) for a, b in itertools.pairwise(input_keys)
        )
        if len(call.keys) > 1 and not end_to_end:
            copied += 2 * n_kv
    return allowed, plain, masked, layout.n_tokens**2, copied


def _grid_blocks(layout: Layout) -> int:
    """Entries flex computes beyond the allowed ones in the blocks of
    neighbourhoods on shaped groups (:meth:`Neighbourhood.block_entries
    <patternc.modifiers.Neighbourhood.block_entries>`), per query group."""
    extra = 0
    for call in layout.calls:
        for key in call.attention.keys:
            grid = key.modifiers.grid
            if grid is not None:
                computed = grid.block_entries(BLOCK_SIZE) - grid.pairs()
                extra += computed * sum(1 for q in call.query_tokens if q in layout.input_groups)
    return extra


def _windowed_entries(layout: Layout) -> int:
    """Allowed entries of the calls varlen runs with a sliding window (a
    bounded side other than causal's), which its kernel computes at its
    windowed rate (see ``_HALF``)."""
    return sum(
        call.allowed_entries for call in layout.calls if varlen_window(call) not in (None, (-1, -1), (-1, 0))
    )


@dataclass(frozen=True)
class Workload:
    """What a call computes besides its layout: batch, heads and head size,
    half precision (bf16/fp16) or float32, whether it is differentiated,
    and whether K/V come in the layout's key space (``compact``)."""

    batch: int
    heads: int
    dim: int
    half: bool
    training: bool = False
    compact: bool = False


@dataclass(frozen=True)
class VarlenWork:
    """``varlen``'s launches for a layout on a device, and the K/V elements
    they gather into the kernel's packed order."""

    launches: int
    gathered: int


def price(
    layout: Layout,
    work: Workload,
    *,
    varlen: VarlenWork | None = None,
    flex_ieee: bool = False,
    varlen_flash4: bool = False,
) -> tuple[Estimate, ...]:
    """Predicted times, fastest first: forward alone, or forward and backward
    when ``work.training`` (compute by each backend's backward ratio;
    launches and copies twice: the backward re-reads what the forward
    gathered).

    Args:
        layout: the plan at its sizes.
        work: batch, heads, head size, precision, training, key space.
        varlen: ``varlen``'s launches on the device; None: it cannot run
            the layout there (not priced).
        flex_ieee: float32 ``flex`` runs IEEE products (not three-TF32).
        varlen_flash4: ``varlen`` runs FlashAttention 4.

    Returns:
        One :class:`Estimate` per priced backend, fastest first.
    """
    batch, heads, dim, half = work.batch, work.heads, work.dim, work.half
    training, compact = work.training, work.compact
    allowed, plain, masked, dense, copied = _entries(layout, compact, batch * heads)
    expand = 2 * layout.n_tokens if compact and not layout.key_space.identity else 0
    flop = 4 * batch * heads * dim
    elem = 2 if half else 4
    rates = dict(_HALF if half else _FLOAT)
    if not half and flex_ieee:
        rates["flex"] = _FLOAT_FLEX_IEEE
    if half and varlen_flash4:
        rates["varlen"] = _HALF_VARLEN_FLASH4
    out = []
    for name, rate in rates.items():
        if name == "varlen" and varlen is None:
            continue
        launches, copy = 1, 0.0  # launches, and seconds of copies into and out of the kernel's layout
        entries, with_mask = 0.0, 0.0  # entries computed without a mask and with one
        windowed = 0  # entries of varlen's sliding-window launches
        if name == "batched":
            launches = len(layout.launches)
            copy = copied * batch * heads * dim * elem / _COPY_BYTES_PER_S
            entries, with_mask = plain, masked
        elif name == "varlen":
            assert varlen is not None
            launches, copy = varlen.launches, varlen.gathered * heads * dim * elem / _COPY_BYTES_PER_S
            windowed = _windowed_entries(layout) if rate.windowed_flops_per_s else 0
            entries = allowed - windowed
        elif name == "flex":
            # computed entries: whole blocks around the allowed ones, at most 2x on small groups;
            # a neighbourhood's blocks reach whole rows (frames) of keys around a query block
            entries = min(dense, allowed + _grid_blocks(layout) + 2 * BLOCK_SIZE * layout.n_tokens)
        else:  # dense: every entry under an [n, n] mask
            with_mask = dense
            copy = (dense + expand * heads * dim * elem) * batch / _COPY_BYTES_PER_S
        forward = entries * flop / rate.flops_per_s
        masked_forward = with_mask * flop / (rate.masked_flops_per_s or rate.flops_per_s)
        windowed_forward = windowed * flop / (rate.windowed_flops_per_s or rate.flops_per_s)
        overhead = launches * rate.launch_s + copy
        if training:
            backward = (
                rate.backward * forward
                + (rate.masked_backward or rate.backward) * masked_forward
                + (rate.windowed_backward or rate.backward) * windowed_forward
            )
            seconds = max(2 * overhead + backward, rate.host_training_s)
        else:
            seconds = max(overhead + forward + masked_forward + windowed_forward, rate.host_s)
        out.append(Estimate(name, seconds))
    return tuple(sorted(out, key=lambda e: e.seconds))
