"""Executors: one interface, one module each. A new backend is a new module
and one entry in :data:`EXECUTORS`."""

from __future__ import annotations

from patternc.nn.executors.auto import run_auto
from patternc.nn.executors.batched import run_batched
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.nn.executors.dense import run_dense
from patternc.nn.executors.flex import run_flex
from patternc.nn.executors.linear import run_linear
from patternc.nn.executors.loop import run_loop
from patternc.nn.executors.varlen import run_varlen

__all__ = ["EXECUTORS", "PACKED_KV_READERS", "AttentionInputs", "Executor", "get_executor"]

EXECUTORS: dict[str, Executor] = {
    "batched": run_batched,
    "loop": run_loop,
    "dense": run_dense,
    "flex": run_flex,
    "linear": run_linear,
    "varlen": run_varlen,
    "auto": run_auto,
}

PACKED_KV_READERS = frozenset({"batched", "auto"})
"""The implementations that read :attr:`AttentionInputs.kv` (``batched``'s
key gather, and ``auto`` when it picks ``batched``). A layer whose fused
projection would need a second split to pack K and V does so for these
only: for the others the split costs a copy in the backward and buys nothing."""


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {sorted(EXECUTORS)}"
        ) from None
