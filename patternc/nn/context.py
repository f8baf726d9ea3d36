"""Run-time contexts the attention modules consult: sharding and anchor caches.

Both are entered with ``with`` by the objects that own them
(:class:`patternc.distributed.ContextParallel`,
:class:`patternc.nn.chunked.AnchorCache`), so a whole model runs sharded or
cached without threading an argument through every block. Nothing here
imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from patternc.nn.executors.common import AttentionInputs, Executor

__all__ = ["ACTIVE", "AnchorRecorder", "FullKV", "RuntimeContext", "Sharding", "execute"]

FullKV = dict[str, tuple[Tensor, Tensor]]
"""``{group: (keys, values)}`` token-major ``[B, n, H, D]``, every token of the group."""


class Sharding(Protocol):
    """What the attention modules need from a context-parallel run."""

    def attend(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        """This rank's output, and the groups whose keys/values it now holds in full."""
        ...

    def local_positions(self, device: torch.device) -> Tensor:
        """Each local token's position within its group (global, not local)."""
        ...


class AnchorRecorder(Protocol):
    """What the attention modules need from a chunked-inference cache."""

    recording: bool
    offsets: dict[str, int]

    def store(self, module: nn.Module, cache: dict[str, dict[str, Tensor]]) -> None: ...

    def load(self, module: nn.Module) -> dict[str, dict[str, Tensor]]: ...

    def check(self, module: nn.Module, layout: object) -> None: ...


class RuntimeContext:
    """The sharding and the anchor cache in force (None: none), per process.

    Plain attributes, not ``contextvars``: ``torch.compile`` traces a read
    of them (and guards on it) where ``ContextVar.get`` breaks the graph."""

    sharding: Sharding | None = None
    cache: AnchorRecorder | None = None


ACTIVE = RuntimeContext()


def execute(executor: Executor, inputs: AttentionInputs) -> Tensor:
    """``executor(inputs)``, sharded when a :class:`Sharding` is active."""
    sharding = ACTIVE.sharding
    if sharding is None:
        return executor(inputs)
    return sharding.attend(inputs, executor, False)[0]
