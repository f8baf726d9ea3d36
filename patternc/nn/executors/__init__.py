"""Executors: one interface, one module each. A new backend is a new module
and one entry in :data:`EXECUTORS`.

An executor maps :class:`AttentionInputs` to the output and keeps no state
of its own: what it derives from a layout (device tables, ``auto``'s pick)
goes into that layout's tables (``inputs.layout.tables``, see
:mod:`patternc.lower.tables`), which the layout cache owns."""

from __future__ import annotations

from patternc.nn.executors.auto import run_auto
from patternc.nn.executors.batched import run_batched
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.nn.executors.dense import run_dense
from patternc.nn.executors.flex import run_flex
from patternc.nn.executors.linear import run_linear
from patternc.nn.executors.loop import run_loop
from patternc.nn.executors.varlen import run_varlen

__all__ = ["EXECUTORS", "AttentionInputs", "Executor", "get_executor"]

EXECUTORS: dict[str, Executor] = {
    "batched": run_batched,
    "loop": run_loop,
    "dense": run_dense,
    "flex": run_flex,
    "linear": run_linear,
    "varlen": run_varlen,
    "auto": run_auto,
}


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {sorted(EXECUTORS)}"
        ) from None
