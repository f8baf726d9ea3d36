"""The FlexAttention executor: one fused call for the whole pattern set.

Queries, keys and values are padded to a bucketed length (so changing sizes
reuse a few compiled kernels; K/V given for the layout's key space keep it,
the tables then indexing it), the block mask comes from the group layout
(:mod:`patternc.nn.flexmask`) and is kept in the layout's tables per (cache
lengths, device, padding), and the kernel with its non-finite guard is one graph,
compiled once per process with static shapes (:func:`_compiled`). On a
GPU the guard runs only where a computed block holds a query and a key of
an unread pair of groups (:func:`_values_cross_groups`), or with a key
padding mask; with the Triton kernel it is one fused pass over K and V
(:func:`_attend_bad_keys`). Where Q, K and V are the thirds of one fused
projection, one pad brings all three to the bucketed length (:func:`_padded`).
The kernel and its ``kernel_options`` (tiles swept best per dtype, head
size and GPU; FlashAttention 4 for large half-precision calls) are chosen
by :mod:`patternc.nn.executors.flexkernels`.

Where torch cannot run it, ``flex`` falls back to ``batched`` with a one-time
warning: gradients on CPU (torch has no FlexAttention backward there), one
head on CPU (Inductor's CPU kernel fails to compile it), attention dropout
(FlexAttention has none) and heads narrower than 16 on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.lower.layout import Layout
from patternc.nn.executors import flash4, flexkernels
from patternc.nn.executors.batched import run_as_batched, run_batched
from patternc.nn.executors.common import AttentionInputs, compact_keys
from patternc.nn.executors.flexkernels import KernelOptions
from patternc.nn.flexmask import (
    BLOCK_SIZE,
    FlexTables,
    ScoreMod,
    group_segments,
    values_cross_groups,
    with_mask_mod,
)
from patternc.nn.tables import table, table_bytes

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["block_mask_builds", "compiled", "flex_tables", "kernel_of", "run_flex"]

_builds = 0
_use_compiled = True
_warned: set[str] = set()


def block_mask_builds() -> int:
    """How many block masks this process has built (a training loop with a
    fixed layout builds one)."""
    return _builds


@contextlib.contextmanager
def compiled(enabled: bool) -> Iterator[None]:
    """Run FlexAttention compiled (the default) or eagerly (slow; for debugging)."""
    global _use_compiled
    previous, _use_compiled = _use_compiled, enabled
    try:
        yield
    finally:
        _use_compiled = previous


@functools.cache
def _compiled(attend: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``attend`` (one of :data:`_ATTEND`) compiled once
    per process: the non-finite guard, the kernel and the poisoning are one
    graph, so a call pays one set of guards and a few fused kernels rather
    than a dozen eager dispatches around a compiled kernel (about half the
    time per call at 10k tokens).

    Shapes stay static (``dynamic=False``): the inputs arrive padded to
    bucketed lengths, so a few kernels serve many sizes, and FlexAttention's
    dynamic-shape kernels are slow: once one shape change makes Dynamo
    recompile dynamically, every later call in the process runs the
    dynamic kernel, a few times slower in bf16 and close to dense time in
    float32. On CPU, torch's C++ code generation of dynamic-shape
    FlexAttention fails outright."""
    _raise_recompile_limit(64)
    return torch.compile(attend, dynamic=False, fullgraph=True)


def _past_recompile_limit(error: Exception) -> bool:
    """Whether ``error`` is what a ``fullgraph`` compile raises past the
    recompile limit: ``FailOnRecompileLimitHit`` (``FailOnCacheLimitHit``
    in older torch), or on torch 2.6 ``RecompileLimitExceeded``, which it
    raises instead unless ``fail_on_cache_limit_hit`` is set."""
    import torch._dynamo.exc as dynamo_errors

    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit", "RecompileLimitExceeded", "CacheLimitExceeded")
    limit_hit = tuple(getattr(dynamo_errors, name) for name in names if hasattr(dynamo_errors, name))
    return bool(limit_hit) and isinstance(error, limit_hit)


_LIMIT_SETTINGS = ("recompile_limit", "cache_size_limit")
"""Dynamo's recompile limit: torch >= 2.7's name, then the older one."""


def _recompile_limit() -> tuple[str, int]:
    """The limit's setting in this torch and its value."""
    import torch._dynamo.config as dynamo_config

    name = next(n for n in _LIMIT_SETTINGS if hasattr(dynamo_config, n))
    return name, int(getattr(dynamo_config, name))


def _raise_recompile_limit(at_least: int) -> None:
    """Dynamo compiles ``flex_attention`` once per (dtype, grad mode, bucketed
    shape, device...) and after 8 variants of one function (its default
    limit) silently runs it *eagerly*, which materialises every score: a
    20k-token layout then takes dense time and memory, and a large one runs
    out of memory. A model with a few dtypes and layouts passes 8 quickly, so raise
    the limit (never lower it). ``recompile_limit`` is torch >= 2.7's name,
    ``cache_size_limit`` the older one."""
    import torch._dynamo.config as dynamo_config

    for name in _LIMIT_SETTINGS:
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < at_least:
            setattr(dynamo_config, name, at_least)


Guard = Literal["none", "keys", "poison"]
"""How a call keeps a non-finite value in the queries that read it, where a
computed block holds a key that some of its queries must not see (a weight
of 0 times NaN is NaN): ``"none"``, no block does; ``"keys"``, the CUDA
Triton kernel's guard (:func:`_attend_bad_keys`: one fused pass over K and
V, the kernel itself then poisons the readers); ``"poison"``, the general
one (:func:`_attend`: the readers are found from the group tables), for the
CPU kernel, FLASH and key padding."""


def _attend_fn(guard: Guard, traced: bool) -> Callable[..., Tensor]:
    """The compiled attention function for ``guard``; ``traced`` (inside a
    user's ``torch.compile``) the plain one, which Dynamo traces into the
    user's graph (reaching the cached compiled one there would warn that
    Dynamo skips ``lru_cache``). Every variant returns the kernel's
    head-major ``[B, H, N, D]`` but ``"poison"``, which returns ``[B, N, H, D]``."""
    attend = _ATTEND[guard]
    return _compiled(attend) if _use_compiled and not traced else attend


def kernel_of(inputs: AttentionInputs) -> str:
    """What :func:`run_flex` runs these inputs on (eagerly): ``"flash"``
    (FlashAttention 4), ``"triton"``, or ``"batched"`` where it falls back."""
    if _fallback_reason(inputs.q, inputs.dropout_p) is not None:
        return "batched"
    return "flash" if flexkernels.flash_backend(inputs) else "triton"


def flex_tables(
    layout: Layout,
    cache_lengths: Mapping[str, int],
    device: torch.device,
    block_size: int = BLOCK_SIZE,
    positions: bool = False,
    compact: bool = False,
) -> FlexTables:
    """The layout's device tables, kept in the layout's tables per (cache
    lengths, device, block size, whether positions are built, whether keys
    index the key space)."""
    key = _tables_key(cache_lengths, device, block_size, positions, compact)
    build = functools.partial(FlexTables.build, layout, cache_lengths, device, block_size, positions, compact)
    return table(layout, key, build, traceable=True)


def _tables_key(
    cache_lengths: Mapping[str, int],
    device: torch.device,
    block_size: int,
    positions: bool,
    compact: bool,
) -> tuple[object, ...]:
    lengths = tuple(sorted(cache_lengths.items()))
    return ("flex tables", lengths, device, block_size, positions, compact)


def _block_mask(
    layout: Layout,
    tables: FlexTables,
    key_padding_mask: Tensor | None,
    key: tuple[Any, ...],
    device: torch.device,
) -> BlockMask:
    """The block mask. Where this process's compiled kernel runs it (Triton
    on a GPU, Inductor's C++ kernel on a CPU: both skip unlisted blocks), its
    ``mask_mod`` is exact only within the listed blocks
    (:meth:`FlexTables.mask_mod`); the exact one is stored as well, sharing
    the block lists, since eager FlexAttention evaluates the ``mask_mod``
    everywhere and a user's ``torch.compile`` reads the stored mask with a
    backend that may not skip blocks."""
    global _builds
    within = _use_compiled and not layout.tables.traced
    if key_padding_mask is not None:  # the padding differs per batch: not cached
        _builds += 1
        exact = tables.block_mask(key_padding_mask)
        if within:
            return with_mask_mod(exact, tables.mask_mod(key_padding_mask, within_blocks=True))
        return exact
    exact = _stored_block_mask(layout, "flex block mask", key, tables.block_mask)
    if not within:
        return exact
    return table(
        layout,
        ("flex block mask within blocks", *key),
        lambda: with_mask_mod(exact, tables.mask_mod(within_blocks=True)),
        traceable=True,
    )


def _flash_block_mask(layout: Layout, tables: FlexTables, key: tuple[Any, ...]) -> BlockMask:
    """The block mask for the FLASH backend: its ``mask_mod`` reads int32
    group tables (FlashAttention 4's generated mask code stores indices as
    int32 and refuses int64 ones: "Type mismatch, store Int64 to Tensor with
    element type Int32"), through the run-table lookups (the Triton
    kernel's bit tests use int64 words)."""

    def narrow() -> BlockMask:
        return dataclasses.replace(
            tables, q_group=tables.q_group.int(), kv_group=tables.kv_group.int()
        ).block_mask(lookups=True)

    return _stored_block_mask(layout, "flex flash block mask", key, narrow)


def _stored_block_mask(
    layout: Layout, kind: str, key: tuple[Any, ...], build: Callable[[], BlockMask]
) -> BlockMask:
    """A block mask kept in the layout's tables (traceable), counted when built."""

    def counted() -> BlockMask:
        global _builds
        _builds += 1
        return build()

    return table(layout, (kind, *key), counted, traceable=True)


def _score_mod(layout: Layout, tables: FlexTables, slopes: Tensor | None) -> ScoreMod | None:
    """ALiBi's ``score_mod``, one closure per (tables, slopes) so the compiled
    kernel is reused across calls (a new closure would recompile)."""
    if slopes is None:
        return None
    key = ("flex score mod", id(tables), slopes.data_ptr(), slopes.device, tuple(slopes.shape))
    owner, score_mod = table(layout, key, lambda: (tables, tables.alibi_score_mod(slopes)))
    if owner is not tables:  # an id reused after the old tables were freed
        owner, score_mod = tables, tables.alibi_score_mod(slopes)
    return score_mod


def _fallback_reason(q: Tensor, dropout_p: float) -> str | None:
    if dropout_p > 0:
        return "attention dropout (FlexAttention has none)"
    if q.is_cuda:
        if q.shape[-1] < 16:
            return f"head_dim {q.shape[-1]} < 16 (FlexAttention's GPU kernels need at least 16)"
        return None
    if q.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and q.requires_grad:
        return "gradients on CPU (torch's FlexAttention has no CPU backward)"
    if q.shape[2] == 1:
        # the graph around the kernel ends in the guard's pointwise re-poisoning
        # of its output; with one head that reads the output at the index it
        # writes, so Inductor fuses it into the C++ FlexAttention template,
        # which then raises "Unsupported for `epilogue_nodes`" (torch 2.13)
        return "one head on CPU (Inductor's CPU FlexAttention kernel fails to compile for it)"
    if _CPU_KERNEL_FAILED:
        return _CPU_KERNEL_FAILED[0]
    return None


_CPU_KERNEL_FAILED: list[str] = []
"""The reason, once this torch failed to build FlexAttention's C++ kernel
for the CPU: later CPU calls run as batched without trying again (each try
costs a full C++ compile). torch 2.8.0 emits that kernel with an unclosed
brace for every mask (plain ``flex_attention`` fails the same; 2.6, 2.11
and 2.13 build it)."""


def _cpu_kernel_build_failed(error: BaseException, q: Tensor) -> str | None:
    """The fallback reason when ``error`` is Inductor failing to compile the
    C++ of a CPU FlexAttention kernel (a ``CppCompileError`` anywhere in the
    chain: torch wraps it in ``InductorError`` or ``BackendCompilerFailed``)."""
    if q.device.type != "cpu":
        return None
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "CppCompileError" or "CppCompileError:" in str(seen):
            return (
                f"torch {torch.__version__} failing to build FlexAttention's CPU kernel "
                "(a C++ compile error in torch's generated code)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, length, H, D]`` zero-padded (no copy when ``N`` is ``length``)."""
    return t if t.shape[1] == length else F.pad(t, (0, 0, 0, 0, 0, length - t.shape[1]))


def _pad_heads_first(t: Tensor, length: int) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, H, length, D]`` zero-padded: the kernel's
    layout, for benchmarks that time the kernel alone."""
    return _pad_tokens(t, length).transpose(1, 2)


def _padded(
    q: Tensor, k: Tensor, v: Tensor, q_len: int, kv_len: int, traced: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K and V zero-padded to the bucketed lengths: one pad of the fused
    projection where they are its three thirds (:func:`_fused_projection`),
    else one each. Each pad is a few launches of host time, so a layer call
    pays one instead of three."""
    if q_len == q.shape[1] and kv_len == k.shape[1]:
        return q, k, v
    fused = None if traced or q_len != kv_len else _fused_projection(q, k, v)
    if fused is None:
        return _pad_tokens(q, q_len), _pad_tokens(k, kv_len), _pad_tokens(v, kv_len)
    batch, n, heads, dim = q.shape
    padded = F.pad(fused, (0, 0, 0, q_len - n)).view(batch, q_len, 3, heads, dim)
    q, k, v = padded.unbind(2)
    return q, k, v


def _fused_projection(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """``q``, ``k`` and ``v`` as one ``[B, N, 3 * H * D]`` tensor where they
    are the thirds of a fused QKV projection (``view(B, N, 3, H, D).unbind(2)``
    of a contiguous tensor, as the layer splits them), else None. Padding it
    pads all three, and autograd reaches the projection through it as
    through the views. (The views' ``_base`` is the projection's contiguous
    output; ``nn.Linear`` on a batch makes it ``[B * N, 3 * H * D]``.)"""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    batch, n, heads, dim = q.shape
    width = heads * dim
    if k.shape != q.shape or v.shape != q.shape or base.numel() != batch * n * 3 * width:
        return None
    if not q.stride() == k.stride() == v.stride() == (n * 3 * width, 3 * width, dim, 1):
        return None
    start = base.storage_offset()
    offsets = (q.storage_offset() - start, k.storage_offset() - start, v.storage_offset() - start)
    return base.view(batch, n, 3 * width) if offsets == (0, width, 2 * width) else None


class _Call:
    """What a call of one layout needs besides Q, K and V: its tables, block
    mask, ``score_mod``, kernel options and :data:`Guard` (with the guard's
    tables where it poisons). A plain eager call (no cache, key padding,
    ALiBi or dropout) keeps it in the layout's tables under
    :func:`_warm_key`, so the next one with the same shape, dtype, device
    and grad mode makes one lookup instead of a dozen. It holds the tables
    and block mask stored under their own keys, and is weighed with them
    (:meth:`weight`): kept longer than they are, it keeps them alive."""

    __slots__ = ("block_mask", "guard", "guard_tables", "options", "score_mod", "tables")

    def __init__(
        self,
        tables: FlexTables,
        block_mask: BlockMask,
        score_mod: ScoreMod | None,
        options: KernelOptions | None,
        guard: Guard,
    ) -> None:
        self.tables = tables
        self.block_mask = block_mask
        self.score_mod = score_mod
        self.options = options
        self.guard = guard
        self.guard_tables = tables.guard_tables if guard == "poison" else ()

    def weight(self) -> int:
        """The bytes the layout's tables count for it: its tables' (see
        :func:`~patternc.nn.tables.table_bytes`)."""
        return table_bytes(self.tables)


WarmKey = tuple[str, torch.Size, torch.dtype, torch.device, bool, bool, int, str, bool]
"""``("flex call", q.shape, q.dtype, q.device, differentiated, keys_compact,
block_size, products, flash)``: one flat tuple, built and hashed once per
call; ``products`` is float32's product precision on CUDA (the kernel
options follow a change of it), else empty; ``flash`` whether FlashAttention
4 can run here (it follows ``flash4.enabled``; whether this call takes it
is fixed by the rest of the key)."""


def _warm_key(inputs: AttentionInputs, block_size: int) -> WarmKey | None:
    """The key of a plain eager call's :class:`_Call`, or None where the
    call is not plain (a cache, key padding, ALiBi, dropout; inside a
    user's ``torch.compile``, where the graph holds the decisions)."""
    layout = inputs.layout
    if (
        layout.cached_groups
        or inputs.key_padding_mask is not None
        or inputs.alibi_slopes is not None
        or inputs.dropout_p
        or layout.tables.traced
    ):
        return None
    q = inputs.q
    grad = (q.requires_grad or inputs.k.requires_grad or inputs.v.requires_grad) and torch.is_grad_enabled()
    products, flash = "", False
    if q.is_cuda:
        products = flexkernels.float32_products(q.device) if q.dtype == torch.float32 else ""
        flash = flash4.usable(q.device, q.shape[-1])
    return ("flex call", q.shape, q.dtype, q.device, grad, inputs.keys_compact, block_size, products, flash)


def run_flex(inputs: AttentionInputs, block_size: int = BLOCK_SIZE) -> Tensor:
    """Reads K/V in token space or in the layout's key space (``keys_compact``:
    the tables then index the key space, so nothing is copied back)."""
    q, k, v, layout, cache = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.cache
    key_padding_mask, dropout_p = inputs.key_padding_mask, inputs.dropout_p
    reason = _fallback_reason(q, dropout_p)
    if reason is not None:
        return run_as_batched(inputs, "flex", reason, _warned)
    warm = _warm_key(inputs, block_size)
    if warm is not None:
        found = layout.tables.entries.get(warm)
        if isinstance(found, _Call):  # a warm plain call: one lookup
            out = _launch(inputs, found, k, v)
            return run_as_batched(inputs, "flex", out, _warned) if isinstance(out, str) else out
    lengths = {g: cache[g][0].shape[1] for g in layout.cached_groups}
    slopes = inputs.alibi_slopes
    compact = inputs.keys_compact
    if compact and key_padding_mask is not None:
        key_padding_mask = compact_keys(key_padding_mask, layout.key_space)
    tables_key = _tables_key(lengths, q.device, block_size, slopes is not None, compact)
    if layout.tables.missing_in_trace(tables_key) or (key_padding_mask is not None and layout.tables.traced):
        # inside a user's torch.compile, with tables no eager call stored (a
        # layout not run eagerly; a padding's block mask is built per call):
        # computed in the user's graph, Inductor cannot lower flex_attention
        # on them (see patternc.nn.tables)
        return run_batched(inputs)
    tables = flex_tables(layout, lengths, q.device, block_size, slopes is not None, compact)
    if layout.cached_groups:
        k = torch.cat([k, *(cache[g][0] for g in layout.cached_groups)], dim=1)
        v = torch.cat([v, *(cache[g][1] for g in layout.cached_groups)], dim=1)
    padding = None
    if key_padding_mask is not None:
        padding = F.pad(key_padding_mask, (0, tables.kv_len - key_padding_mask.shape[1]), value=False)
    key = tables_key[1:]
    flash = flexkernels.flash_backend(inputs)
    call = _Call(
        tables,
        _flash_block_mask(layout, tables, key)
        if flash
        else _block_mask(layout, tables, padding, key, q.device),
        _score_mod(layout, tables, slopes),
        flexkernels.FLASH_OPTIONS if flash else flexkernels.kernel_options(q),
        _guard(layout, tables, key, padding is not None, q.device, flash),
    )
    out = _launch(inputs, call, k, v)
    if isinstance(out, str):  # no kernel for this call
        return run_as_batched(inputs, "flex", out, _warned)
    if warm is not None:
        layout.tables.get(warm, lambda: call, _Call.weight)
    return out


def _launch(inputs: AttentionInputs, call: _Call, k: Tensor, v: Tensor) -> Tensor | str:
    """Pad, run the compiled kernel with ``call``'s guard, and take the
    output back to token-major ``[B, N, H, D]`` (a view where no guard
    poisons); or the reason the call has no kernel: Inductor failed to
    build the CPU kernel, or Dynamo is past its recompile limit."""
    q = inputs.q
    n_queries = q.shape[1]
    tables, traced = call.tables, inputs.layout.tables.traced
    q, k, v = _padded(q, k, v, tables.q_len, tables.kv_len, traced)
    args = (q, k, v, call.block_mask, call.score_mod, inputs.scale, call.options)
    try:
        attend = _attend_fn(call.guard, traced)
        out = attend(*args, *call.guard_tables) if call.guard == "poison" else attend(*args).transpose(1, 2)
    except Exception as error:
        failed = _cpu_kernel_build_failed(error, q)
        if failed is not None:
            _CPU_KERNEL_FAILED.append(failed)
            return failed
        if not _past_recompile_limit(error):
            raise
        setting, limit = _recompile_limit()
        return (
            f"a shape past Dynamo's recompile limit ({limit} kernels; raise "
            f"torch._dynamo.config.{setting} to compile more)"
        )
    return out if out.shape[1] == n_queries else out[:, :n_queries]


def _guard(
    layout: Layout, tables: FlexTables, key: tuple[Any, ...], padded: bool, device: torch.device, flash: bool
) -> Guard:
    """The call's :data:`Guard`. A key padding mask masks keys inside
    blocks; on CPU the poisoning guard always runs: Inductor's CPU kernel
    drops a NaN score (a NaN key) in a full block, where the GPU kernel and
    separate calls give NaN; on FLASH too (its handling of a NaN score is
    not checked). The CUDA Triton kernel turns a NaN score into a NaN
    output, so there a bad key's readers are found by the kernel itself."""
    if padded or device.type != "cuda" or flash:
        return "poison"
    return "keys" if _values_cross_groups(layout, tables, key) else "none"


def _values_cross_groups(layout: Layout, tables: FlexTables, key: tuple[Any, ...]) -> bool:
    """Whether a non-finite value could reach, in this layout's blocks, a
    query of a group that does not read its group (then the guard runs):
    ``FlexTables.needs_value_guard`` narrowed to the blocks that hold an
    unread pair of groups beside an allowed one
    (:func:`~patternc.nn.flexmask.values_cross_groups`), kept per layout."""
    if not tables.needs_value_guard:
        return False
    lengths, _, block_size, _, compact = key

    def decide() -> bool:
        queries, keys = group_segments(layout, dict(lengths), compact)
        return values_cross_groups(queries, keys, layout.pairs.keys(), block_size)

    return table(layout, ("flex value guard", *key), decide, traceable=True)


def _attend_unguarded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    score_mod: ScoreMod | None,
    scale: float | None,
    kernel_options: KernelOptions | None,
) -> Tensor:
    """``[B, N, H, D]`` in, the kernel's ``[B, H, N, D]`` out, at the
    bucketed lengths: one ``flex_attention``. Its inputs come padded, so the
    compiled graph sees bucketed shapes only (a few kernels for many sizes).
    The output stays head-major; the caller transposes the view."""
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        kernel_options=kernel_options,  # type: ignore[arg-type]  # torch's TypedDict lacks the fwd_ keys it takes
    )
    assert isinstance(out, Tensor)
    return out


def _attend_bad_keys(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    score_mod: ScoreMod | None,
    scale: float | None,
    kernel_options: KernelOptions | None,
) -> Tensor:
    """:func:`_attend_unguarded` with each non-finite token's value row
    zeroed and its key row made NaN, in one fused pass before the kernel.
    A query that reads the token then gets a NaN score, and the CUDA Triton
    kernel carries a NaN score to the query's output (as separate calls
    do); for a query that must not see it, the ``mask_mod`` replaces the
    score by ``-inf`` and the zeroed value row adds ``0 * 0``. So no table
    of who reads whom is consulted, and the graph holds one pass over K and
    V besides the kernel. ``[B, H, N, D]`` out."""
    bad = _bad_tokens(k, v)[..., None]
    k = k.masked_fill(bad, float("nan"))
    v = v.masked_fill(bad, 0.0)
    return _attend_unguarded(q, k, v, block_mask, score_mod, scale, kernel_options)


def _bad_tokens(k: Tensor, v: Tensor) -> Tensor:
    """``[B, Nk, H]``: the tokens whose key or value row holds a non-finite
    number, tested through their float32 sums (two reductions, no
    full-size test): a row whose values sum past float32's range counts as
    non-finite."""
    return ~torch.isfinite(k.sum(-1, dtype=torch.float32) + v.sum(-1, dtype=torch.float32))


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    score_mod: ScoreMod | None,
    scale: float | None,
    kernel_options: KernelOptions | None,
    *guard_tables: Tensor,
) -> Tensor:
    """:func:`_attend_unguarded` with non-finite value rows zeroed before the
    kernel and NaN put back after it where separate attention calls would
    have it, for layouts whose blocks mix groups; ``[B, N, H, D]`` out.
    ``guard_tables``: :attr:`FlexTables.guard_tables
    <patternc.nn.flexmask.FlexTables.guard_tables>`."""
    v, bad = _finite_values(k, v)
    out = _attend_unguarded(q, k, v, block_mask, score_mod, scale, kernel_options).transpose(1, 2)
    return _poison(out, bad, *guard_tables)


def _finite_values(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """V with the rows of non-finite tokens zeroed, and which tokens those
    are (``[B, Nk, H]``). A partial block multiplies masked keys' values by
    weight 0, and ``0 * NaN`` is NaN: left in, a bad value row would reach
    queries of other groups. Keys stay as they are: a masked score is
    replaced by ``-inf``, NaN or not. Rows are tested through their float32
    sums (two reductions, no full-size test): a row whose values sum past
    float32's range counts as non-finite."""
    bad = _bad_tokens(k, v)
    return v.masked_fill(bad[..., None], 0.0), bad


def _poison(
    out: Tensor,
    bad: Tensor,
    q_group: Tensor,
    key_group: Tensor,
    key_start: Tensor,
    key_stop: Tensor,
    run_query: Tensor,
    run_first: Tensor,
    run_stop: Tensor,
    row_start: Tensor,
) -> Tensor:
    """NaN for the queries whose groups attend to a group holding a
    non-finite key (what separate attention calls give), without a host sync.

    Linear in the tokens, key segments and runs of allowed group pairs (no
    ``[tokens, groups]`` or ``[groups, groups]`` table): bad keys are
    counted per key segment from a prefix sum over the keys and added up
    per group, then per run of key groups from a prefix sum over the
    groups, and each run's count goes to its query group. ``bad``:
    ``[B, Nk, H]``; the tables are :attr:`FlexTables.guard_tables
    <patternc.nn.flexmask.FlexTables.guard_tables>` (key segments covering
    the keys; runs: ``run_query`` reads key groups ``[run_first, run_stop)``;
    ``row_start`` only sizes the groups)."""
    batch, n_keys, heads = bad.shape
    size = row_start.shape[0] - 1  # the groups and the padding
    counts = F.pad(bad.to(torch.int64).cumsum(1), (0, 0, 1, 0))  # [B, Nk + 1, H]
    per_segment = counts[:, key_stop.clamp_max(n_keys)] - counts[:, key_start.clamp_max(n_keys)]
    per_group = counts.new_zeros(batch, size, heads).index_add_(1, key_group, per_segment)
    by_group = F.pad(per_group.cumsum(1), (0, 0, 1, 0))  # [B, size + 1, H]
    per_run = by_group[:, run_stop] - by_group[:, run_first]  # [B, R, H]
    per_query = counts.new_zeros(batch, size, heads).index_add_(1, run_query, per_run)
    poisoned = per_query[:, q_group[: out.shape[1]]] > 0  # [B, Nq, H]
    return out.masked_fill(poisoned[..., None], float("nan"))


_ATTEND: dict[str, Callable[..., Tensor]] = {
    "none": _attend_unguarded,
    "keys": _attend_bad_keys,
    "poison": _attend,
}
