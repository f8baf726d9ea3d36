"""Run-time contexts the attention modules consult: sharding and anchor caches.

Both are entered with ``with`` by the objects that own them
(:class:`patternc.distributed.ContextParallel`,
:class:`patternc.nn.chunked.AnchorCache`), so a whole model runs sharded or
cached without threading an argument through every block. Nothing here
imports ``torch.distributed``.

Each thread has its own context: a model called from two threads, one of
them inside ``chunked``, runs chunked in that thread only. A
``torch.compile`` trace cannot ask which thread it is in, so traced code
reads :data:`ACTIVE`, the context the most recently entered ``with``
installed: compiled modules run chunked or sharded from one thread at a time.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch
from torch import Tensor, nn

from patternc.nn.executors.common import AttentionInputs, Executor

__all__ = [
    "ACTIVE",
    "AnchorRecorder",
    "FullKV",
    "RuntimeContext",
    "Sharding",
    "active",
    "execute",
    "swap_cache",
    "swap_sharding",
]

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
    sharded: bool

    def store(self, module: nn.Module, cache: dict[str, dict[str, Tensor]]) -> None: ...

    def load(self, module: nn.Module) -> dict[str, dict[str, Tensor]]: ...

    def check(self, module: nn.Module, layout: object) -> None: ...


class RuntimeContext:
    """The sharding and the anchor cache in force (None: none).

    Plain attributes, not ``contextvars``: ``torch.compile`` traces a read
    of them (and guards on it) where ``ContextVar.get`` breaks the graph."""

    def __init__(self) -> None:
        self.sharding: Sharding | None = None
        self.cache: AnchorRecorder | None = None


ACTIVE = RuntimeContext()
"""The context traced code reads (see the module docstring)."""

_THREADS = threading.local()


def active(traced: bool = False) -> RuntimeContext:
    """This thread's context; :data:`ACTIVE` for a ``traced`` caller (one
    the compile boundary, :mod:`patternc.nn.traced_layouts`, told it runs
    inside a ``torch.compile`` trace)."""
    if traced:
        return ACTIVE
    context: RuntimeContext | None = getattr(_THREADS, "context", None)
    if context is None:
        context = _THREADS.context = RuntimeContext()
    return context


def swap_cache(cache: AnchorRecorder | None) -> AnchorRecorder | None:
    """Install ``cache`` as this thread's anchor cache; returns the one it replaces."""
    context = active()
    previous, context.cache = context.cache, cache
    ACTIVE.cache = cache
    return previous


def swap_sharding(sharding: Sharding | None) -> Sharding | None:
    """Install ``sharding`` as this thread's sharding; returns the one it replaces."""
    context = active()
    previous, context.sharding = context.sharding, sharding
    ACTIVE.sharding = sharding
    return previous


def execute(executor: Executor, inputs: AttentionInputs) -> Tensor:
    """``executor(inputs)``, sharded when a :class:`Sharding` is active."""
    sharding = active(inputs.layout.tables.traced).sharding
    if sharding is None:
        return executor(inputs)
    return sharding.attend(inputs, executor, False)[0]
