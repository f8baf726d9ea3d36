"""Device tables of a layout, kept in the layout's own slot.

A :class:`~patternc.lower.layout.Layout` is plain integers; executors also need
device tensors made from it (positions within groups, FlexAttention's group
tables, varlen's packed indices). Building them costs host time and
host-to-device copies, so each is built once and kept in the layout's
:class:`~patternc.lower.tables.Tables` (``layout.tables``): these functions
are how executors read and fill that slot, weighing each table by the bytes
of its tensors so the layout cache bounds layouts and tables together.

Key: ``(kind, *inputs)``, where ``kind`` names the table (``"positions"``,
``"flex groups"``, ``"varlen launches"``, ``"auto estimates"``) and the inputs
are what else it is built from (the device, a batch size, cache lengths).
Under ``torch.compile`` the tables are built in the traced graph instead
(they are a few cheap kernels) and nothing is stored, so Dynamo never traces
a slot's mutation.

The exception is a *traceable* table (FlexAttention's group tables and block
mask, varlen's launches): there the table an eager call stored in the
layout's slot is handed to the trace as it is, so Dynamo passes its tensors
into the user's graph as inputs. Inductor needs that: it cannot lower
``flex_attention`` when the tensors its ``mask_mod`` reads are computed in
the same graph. The trace reaches the slot through the layout it was handed
(:mod:`patternc.nn.traced_layouts`), so a table is only ever found for its
own layout.

:func:`group_positions` of bare sizes (the ``Transformer`` stack's and
``position_ids``' positions, which have no layout at hand) is kept in
:data:`POSITIONS`, keyed by sizes and device alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from patternc.lower.cache import BoundedCache
from patternc.lower.layout import Layout
from patternc.lower.tables import TableKey

__all__ = ["POSITIONS", "group_positions", "kept_table", "stored_table", "table", "table_bytes"]

T = TypeVar("T")


def table(layout: Layout, key: TableKey, build: Callable[[], T], *, traceable: bool = False) -> T:
    """The table ``key`` of ``layout``, built and stored on a miss.

    Args:
        layout: the layout whose slot holds the table.
        key: ``(kind, *inputs)`` (see the module docstring).
        build: makes the table.
        traceable: under ``torch.compile``, hand the trace the table an eager
            call stored rather than build it in the graph.

    Returns:
        The table.
    """
    return layout.tables.get(key, build, table_bytes, traceable=traceable)


def kept_table(layout: Layout, key: TableKey, build: Callable[[], T]) -> T:
    """:func:`table`, stored even while ``torch.compile`` traces (for host
    code that runs as plain Python inside a trace, see
    :meth:`~patternc.lower.tables.Tables.keep`)."""
    return layout.tables.keep(key, build, table_bytes)


def stored_table(layout: Layout, key: TableKey) -> object | None:
    """The table ``key`` of ``layout`` if one is stored, else None."""
    return layout.tables.stored(key)


def table_bytes(table: object) -> int:
    """The bytes of the tensors a table holds (in tuples, lists, dicts and
    dataclasses, as tables are built), plus a small charge per object."""
    if isinstance(table, torch.Tensor):
        return table.untyped_storage().nbytes() if table.numel() else 64
    if isinstance(table, (tuple, list)):
        return 64 + sum(table_bytes(item) for item in table)
    if isinstance(table, dict):
        return 64 + sum(table_bytes(item) for item in table.values())
    if dataclasses.is_dataclass(table) and not isinstance(table, type):
        return 64 + sum(table_bytes(getattr(table, f.name)) for f in dataclasses.fields(table))
    return 64


POSITIONS: BoundedCache[tuple[tuple[int, ...], torch.device], torch.Tensor] = BoundedCache(
    "positions", 256, weigh=table_bytes, max_weight=64 << 20
)
"""Key ``(sizes, device)`` -> :func:`group_positions`' tensor, for callers
without a layout (executors keep theirs in the layout's slot)."""


def group_positions(sizes: tuple[int, ...], device: torch.device, *, store: bool = True) -> torch.Tensor:
    """``[sum(sizes)]``: each token's index within its group, for groups of
    ``sizes`` laid out in order. Built once per (sizes, device) with no host
    synchronisation (kept in :data:`POSITIONS`), so later calls are free and
    CUDA-graph capturable (warm up before capturing: the first call copies
    ``sizes`` to the device). ``store=False``: a traced caller's (see
    :mod:`patternc.nn.traced_layouts`), built when missing, never stored."""
    return POSITIONS.get_or_build((sizes, device), lambda: build_positions(sizes, device), store=store)


def build_positions(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`group_positions`, built afresh."""
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    n = sum(sizes)
    return torch.arange(n, device=device) - torch.repeat_interleave(starts, counts, output_size=n)
