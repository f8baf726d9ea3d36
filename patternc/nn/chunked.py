"""Chunked inference: millions of query tokens against anchors computed once.

An AB-UPT surrogate's queries attend to anchors and nothing attends to the
queries, so every layer's anchor keys/values are the same whatever queries
run beside them. :func:`chunked` runs the model once on the anchors (the
context groups), recording each attention module's keys/values in an
:class:`AnchorCache`, then runs the queries chunk by chunk with the anchors
read from that cache: the output equals one shot, and peak memory is set by
the chunk, not by the number of queries.

>>> import torch, patternc
>>> plan = patternc.compile("groups anchors queries\\n* -> anchors").patterns["default"]
>>> attn = patternc.nn.PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
>>> x = torch.randn(1, 4 + 10, 8)
>>> sizes = {"anchors": 4, "queries": 10}
>>> out = chunked(attn, x, sizes, ["queries"], chunk_size=3)  # attn returns (out, cache)
>>> torch.allclose(out, attn(x, sizes)[0], atol=1e-6)
True
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from patternc.nn.attention import plain_sizes
from patternc.nn.context import swap_cache

__all__ = ["AnchorCache", "Forward", "chunked"]

KVEntry = dict[str, dict[str, Tensor]]
Forward = Callable[[Tensor, dict[str, Any]], Tensor | tuple[Tensor, Any]]
"""``forward(x, sizes) -> output``: the model on tokens ``x`` of groups ``sizes``
(a ``{group: size}`` dict in plan order; None marks a group read from the cache).
The output may come as ``(output, cache)``, as a ``PatternAttention`` returns
it: the first element is taken."""


class AnchorCache:
    """Each attention module's keys/values of the context groups.

    Keyed by the module and the order of its calls within one forward (a
    module called twice per forward, weight sharing, keeps two entries).
    ``record()`` stores what every attention module computes; ``reuse()``
    makes each module read its entry where it is given no ``kv_cache``.
    """

    def __init__(self, query_groups: Sequence[str]) -> None:
        self.query_groups = frozenset(query_groups)
        self.entries: dict[nn.Module, list[KVEntry]] = {}
        self.recording = False
        self.offsets: dict[str, int] = {}
        """Per query group, the position of the running chunk's first token in
        the group (the ``Transformer`` stack counts positions from it)."""
        self.sharded = False
        """The context ran sharded: each rank's queries are a part of their
        groups that starts at a position this cache does not know."""
        self._calls: dict[nn.Module, int] = {}

    @contextlib.contextmanager
    def _active(self, recording: bool) -> Iterator[AnchorCache]:
        self.recording = recording
        self._calls = {}
        previous = swap_cache(self)
        try:
            yield self
        finally:
            swap_cache(previous)

    def record(self) -> contextlib.AbstractContextManager[AnchorCache]:
        """Run the model on the context groups inside this to fill the cache."""
        self.entries = {}
        return self._active(True)

    def reuse(
        self, offsets: Mapping[str, int] | None = None
    ) -> contextlib.AbstractContextManager[AnchorCache]:
        """Run one chunk of queries inside this (once per forward); ``offsets``:
        where the chunk starts in each query group."""
        self.offsets = dict(offsets or {})
        return self._active(False)

    def store(self, module: nn.Module, cache: KVEntry) -> None:
        self.entries.setdefault(module, []).append(cache)

    def load(self, module: nn.Module) -> KVEntry:
        index = self._calls.get(module, 0)
        self._calls[module] = index + 1
        recorded = self.entries.get(module, [])
        if index >= len(recorded):
            raise ValueError(
                f"{type(module).__name__} ran {index + 1} time(s) in this chunk but recorded "
                f"{len(recorded)} anchor cache(s); run the same model for the anchors and the chunks"
            )
        return recorded[index]

    def check(self, module: nn.Module, layout: Any) -> None:
        """Refuse a plan whose answer chunks would change: a context group
        that attends to a query group (its output would change with the
        queries, so it cannot be computed once), a query group that attends
        to a query group, itself included (a chunk would see only the chunk's
        keys of that group), and modifiers on a query group's rule."""
        for call in layout.calls:
            context = [q for q in call.attention.queries if q not in self.query_groups]
            seen = [k for k in call.attention.key_names if k in self.query_groups]
            chunked_queries = [q for q in call.attention.queries if q in self.query_groups]
            if context and seen:
                raise ValueError(
                    f"`{context[0]}` attends to `{seen[0]}` (`{call.attention.text()}`), so its "
                    "output depends on the queries and chunked inference cannot compute it once; "
                    "chunk only groups that no other group attends to"
                )
            if chunked_queries and seen:
                query, key = chunked_queries[0], seen[0]
                whose = "its own group" if query == key else f"`{key}`"
                raise ValueError(
                    f"`{query}` attends to {whose} (`{call.attention.text()}`), and `{key}` is chunked: "
                    f"a chunk of `{query}` would see only that chunk's keys of `{key}`, not all of them; "
                    f"chunk only groups that no rule reads as keys/values: leave `{key}` out of the "
                    "queries argument (it then runs once, with the context)"
                )
            if chunked_queries and call.attention.has_modifiers:
                raise ValueError(
                    f"`{call.attention.text()}` has modifiers, which read the positions of "
                    f"`{chunked_queries[0]}` within its group, and chunks renumber them; chunk only "
                    "groups whose rules have no modifiers"
                )


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda done: None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]  # optional extra
    except ImportError:
        start = time.perf_counter()

        def line(done: int) -> None:
            elapsed = time.perf_counter() - start
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\rpatternc: {done:,}/{total:,} queries ({elapsed:.1f} s){end}")
            sys.stderr.flush()

        return line
    bar = tqdm(total=total, unit="query", desc="patternc")
    last = [0]

    def step(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done
        if done >= total:
            bar.close()

    return step


@torch.no_grad()
def chunked(
    forward: Forward,
    x: Tensor,
    sizes: Mapping[str, int],
    queries: Sequence[str],
    chunk_size: int,
    *,
    context_parallel: Any = None,
    progress: bool = False,
) -> Tensor:
    """``forward(x, sizes)`` computed with the ``queries`` groups in chunks of
    at most ``chunk_size`` tokens, the other (context) groups once.

    ``forward`` returns the output, or ``(output, cache)`` as a
    ``PatternAttention`` does (``chunked(attn, x, sizes, ...)``).
    ``x``: ``[B, N, ...]`` tokens of ``sizes``, a ``{group: size}`` dict in
    the order of the groups in ``x``, which is the plan's order. With
    ``context_parallel`` (a :class:`patternc.distributed.ContextParallel`
    built for the context groups, query groups at size 0) the context runs
    sharded, every rank ends with the anchors' full keys/values, and each
    rank's own queries (``x`` holds this rank's context tokens, then its
    queries) run on that rank with no communication. ``progress``: a tqdm
    bar if tqdm is installed, else a line on stderr.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(sizes, Mapping):
        raise TypeError(
            f"sizes must be a {{group: size}} dict in the order of x, got {type(sizes).__name__}; "
            'e.g. {"anchors": 1024, "queries": 4096}'
        )
    sizes = plain_sizes(sizes)  # type: ignore[assignment]  # a Mapping stays one
    bad = {g: n for g, n in sizes.items() if type(n) is not int or n < 0}
    if bad:
        raise ValueError(f"sizes must be integers >= 0 (every group is in x), got {bad}")
    unknown = [q for q in queries if q not in sizes]
    if unknown:
        raise ValueError(f"queries {unknown} are not groups of sizes ({list(sizes)})")
    total = sum(sizes.values())
    if x.dim() < 2 or x.shape[1] != total:
        if x.dim() >= 1 and x.shape[0] == total:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, which has no batch dimension; expected "
                f"[batch, {total}, ...] for sizes adding up to {total}: add one with x[None]"
            )
        raise ValueError(f"x has shape {tuple(x.shape)} but sizes add up to {total} tokens (x.shape[1])")
    offsets, at = {}, 0
    for name, n in sizes.items():
        offsets[name] = at
        at += n
    query_set = set(queries)
    context_rows = [torch.arange(offsets[g], offsets[g] + n) for g, n in sizes.items() if g not in query_set]
    cache = AnchorCache(queries)
    cache.sharded = context_parallel is not None
    context_sizes = {g: (0 if g in query_set else n) for g, n in sizes.items()}
    context_x = x.index_select(1, torch.cat(context_rows).to(x.device)) if context_rows else x[:, :0]
    with contextlib.ExitStack() as stack:
        if context_parallel is not None:
            stack.enter_context(context_parallel)
        stack.enter_context(cache.record())
        context_out = _output(forward(context_x, context_sizes))
    # outputs are written in place, in input order: peak memory is the input,
    # the output and one chunk's work (no list of chunks, no concatenation)
    out = context_out.new_empty((context_out.shape[0], x.shape[1], *context_out.shape[2:]))
    if context_rows:
        out.index_copy_(1, torch.cat(context_rows).to(out.device), context_out)
    del context_out
    n_queries = sum(sizes[g] for g in sizes if g in query_set)
    report = _progress(n_queries, progress)
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        chunk_sizes: dict[str, int | None] = {}
        rows = []
        starts: dict[str, int] = {}
        seen = 0
        for g, n in sizes.items():
            if g not in query_set:
                chunk_sizes[g] = None
                continue
            lo, hi = max(start - seen, 0), min(stop - seen, n)
            chunk_sizes[g] = max(hi - lo, 0)
            starts[g] = lo
            if hi > lo:
                rows.append(torch.arange(offsets[g] + lo, offsets[g] + hi))
            seen += n
        index = torch.cat(rows).to(x.device)
        with cache.reuse(starts):
            chunk_out = _output(forward(x.index_select(1, index), chunk_sizes))
            out.index_copy_(1, index.to(out.device), chunk_out)
        report(stop)
    return out


def _output(result: Tensor | tuple[Tensor, Any]) -> Tensor:
    """The output of a forward that returns it alone or as ``(output, cache)``."""
    if isinstance(result, Tensor):
        return result
    if isinstance(result, tuple) and result and isinstance(result[0], Tensor):
        return result[0]
    raise TypeError(
        f"forward returned {type(result).__name__}; chunked needs a tensor, or a tuple whose first "
        "element is the output tensor (as PatternAttention's (output, cache))"
    )
