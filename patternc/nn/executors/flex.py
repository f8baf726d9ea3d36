"""The FlexAttention executor: one fused call for the whole pattern set.

Queries, keys and values are padded to a bucketed length (so changing sizes
reuse a few compiled kernels), the block mask comes from the group layout
(:mod:`patternc.nn.flexmask`) and is cached per (layout, cache lengths,
device, padding), and the kernel with its non-finite guard is one graph,
compiled once per process with static shapes (:func:`_compiled`). The
guard runs only where a block mixes groups (``FlexTables.needs_value_guard``).
Tiles (``kernel_options``) are the ones swept best per dtype, head size and
GPU (:func:`_kernel_options`).

Where torch cannot run it, ``flex`` falls back to ``batched`` with a one-time
warning: gradients on CPU (torch has no FlexAttention backward there),
attention dropout (FlexAttention has none) and heads narrower than 16 on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.cache import _compiling
from patternc.layout import Layout
from patternc.nn.executors import flash4
from patternc.nn.executors.batched import run_as_batched, run_batched
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.flexmask import BLOCK_SIZE, FlexTables, ScoreMod
from patternc.nn.tables import TABLES

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["block_mask_builds", "compiled", "flex_tables", "float32_products", "kernel_of", "run_flex"]

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
    """``attend`` (:func:`_attend` or :func:`_attend_unguarded`) compiled once
    per process: the non-finite guard, the kernel and the poisoning are one
    graph, so a call pays one set of guards and a few fused kernels rather
    than a dozen eager dispatches around a compiled kernel (0.96 -> 0.44 ms
    per call on an H200 at 10k tokens).

    Shapes stay static (``dynamic=False``): the inputs arrive padded to
    bucketed lengths, so a few kernels serve many sizes, and FlexAttention's
    dynamic-shape kernels are slow. On an H200, once one shape change had
    made Dynamo recompile dynamically, bf16 ran 2.3x slower and float32
    13x slower (29 ms against 2.2 for 10k tokens: dense-like time) in the
    same process. On CPU, torch's C++ code generation of dynamic-shape
    FlexAttention fails outright."""
    _raise_recompile_limit(64)
    return torch.compile(attend, dynamic=False, fullgraph=True)


def _past_recompile_limit(error: Exception) -> bool:
    """Whether ``error`` is what a ``fullgraph`` compile raises past the
    recompile limit (``FailOnRecompileLimitHit``; ``FailOnCacheLimitHit``
    before torch 2.7)."""
    import torch._dynamo.exc as dynamo_errors

    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
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
    limit) silently runs it *eagerly*, which materialises every score: on an
    H100 a 20k-token layout took 174 ms instead of 2 and a 78k one ran out of
    memory. A model with a few dtypes and layouts passes 8 quickly, so raise
    the limit (never lower it). ``recompile_limit`` is torch >= 2.7's name,
    ``cache_size_limit`` the older one."""
    import torch._dynamo.config as dynamo_config

    for name in _LIMIT_SETTINGS:
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < at_least:
            setattr(dynamo_config, name, at_least)


def _attend_fn(guarded: bool) -> Callable[..., Tensor]:
    """The compiled attention function, with or without the non-finite
    guard; inside a user's ``torch.compile`` the plain one, which Dynamo
    traces into the user's graph (reaching the cached compiled one there
    would warn that Dynamo skips ``lru_cache``)."""
    attend = _attend if guarded else _attend_unguarded
    return _compiled(attend) if _use_compiled and not _compiling() else attend


KernelOptions = dict[str, int | str]
"""FlexAttention ``kernel_options``: tiles, warps, stages, product precision."""


_HALF_KERNEL_OPTIONS: KernelOptions = {
    "fwd_BLOCK_M": 128,
    "fwd_BLOCK_N": 64,
    "fwd_num_warps": 4,
    "fwd_num_stages": 3,
}
"""Forward tile for half precision on CUDA, from ``benchmarks/bench_gpu.py``'s
sweep on an H100 (head_dim 64): 200 -> 325 TFLOP/s on AB-UPT self-anchor
2x(8k+24k), 160 -> 243 on joint 2x(1k+4k), against torch's default tiles;
on an H200 it is still the best of seven (368 and 390 TFLOP/s at 2x(8k+24k),
torch's default 255 and 269). The ``fwd_`` prefix (torch >= 2.6) keeps
these options out of the backward kernels: unprefixed, the warps and
stages reached them too and made forward+backward 2.5-4x slower."""

_HOPPER_BACKWARD_OPTIONS: KernelOptions = {
    "bwd_BLOCK_M1": 64,
    "bwd_BLOCK_N1": 64,
    "bwd_BLOCK_M2": 64,
    "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4,
    "bwd_num_stages": 3,
}
"""Backward tiles for half precision, head_dim <= 64, on Hopper (sm_90),
from ``bench_gpu.py``'s sweep on an H200 (kernel alone, rows interleaved),
forward+backward against torch's default backward tiles (with the forward
tile above): 1.09 -> 0.91 ms on AB-UPT self-anchor 2x(1k+4k), 1.53 -> 1.45
ms on joint, 310 -> 346 and 318 -> 355 TFLOP/s at 2x(8k+24k).
32/128/128/32 ties these at 65k tokens and is 11-18% slower at 10k. Tiles
matter both ways: 64/128/128/64 with 4 warps ran at a third of the speed,
so these stay on the GPU and head sizes they were measured on."""

_HOPPER_HALF_OPTIONS = _HALF_KERNEL_OPTIONS | _HOPPER_BACKWARD_OPTIONS


def _backward_tiles(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int) -> KernelOptions:
    """FlexAttention's ``bwd_``-prefixed ``kernel_options`` for these tiles."""
    tiles = {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2, "num_warps": warps}
    return {f"bwd_{key}": value for key, value in {**tiles, "num_stages": stages}.items()}


_HOPPER_FLOAT32_TILES: dict[str, KernelOptions] = {
    "'ieee'": _backward_tiles(64, 64, 64, 64, 8, 1),
    "'tf32x3'": _backward_tiles(32, 32, 32, 32, 4, 2),
    "'tf32'": _backward_tiles(32, 32, 32, 32, 4, 2),
}
"""Backward tiles for float32 at head_dim 64 on Hopper, per product
precision, from ``bench_gpu.py --sweep-fp32`` on an H200 (self-anchor
2x(1k+4k), forward+backward; torch's float32 default is 16/16/16/16, 4 warps,
1 stage): IEEE products 22.4 -> 13.9 ms; three-TF32 products 7.1 -> 4.1 ms.
Gradients are bitwise equal to the default tiles'. Plain TF32 takes the
three-TF32 tiles (not swept on its own). Other head sizes keep torch's tiles."""

_CAPABILITY: dict[int, tuple[int, int]] = {}
"""CUDA device index -> its compute capability (asked once per device)."""


def _read_float32_products() -> str:
    """The float32 products' precision for the kernel: torch's own choice,
    except that an untouched setting gets three-TF32 products.

    Left to itself, torch's FlexAttention computes float32 products in IEEE
    arithmetic on CUDA cores: forward+backward 5x slower than SDPA's
    efficient kernel on an H200. ``'tf32x3'`` splits each factor into two
    TF32 halves and sums three tensor-core products: 2.6x faster forward and
    3.4x forward+backward, within 1.1e-6 of the IEEE result (plain TF32:
    2e-3). So it is the default while torch's float32 matmul
    precision is untouched (``torch.backends.cuda.matmul.fp32_precision`` is
    ``'none'``, torch >= 2.9). An explicit ``'ieee'`` (or
    ``torch.set_float32_matmul_precision("highest")``) gets IEEE products and
    an allowed TF32 gets TF32; before torch 2.9 an untouched setting cannot
    be told from an explicit one, so torch's IEEE stands."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None and setting != "none":  # set for CUDA matmuls (asking the generic one would raise)
        return "'ieee'" if setting == "ieee" else "'tf32'"
    highest = torch.get_float32_matmul_precision() == "highest"
    if setting == "none":
        return "'tf32x3'" if highest else "'tf32'"
    return "'ieee'" if highest and not matmul.allow_tf32 else "'tf32'"


def _read_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITY.get(index)
    if capability is None:
        capability = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return capability


# Constants to Dynamo: traced inside a user's torch.compile, these host
# queries run once at trace time (torch's precision getters cannot be
# traced; fullgraph would fail), as torch's own flex reads its precision
# once per compile. Eager calls run them as they are.
_float32_products: Callable[[], str] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call,unused-ignore]
    _read_float32_products
)
_capability: Callable[[torch.device], tuple[int, int]] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call,unused-ignore]
    _read_capability
)


def float32_products(device: torch.device) -> str:
    """The precision of flex's float32 products on this CUDA device: IEEE
    before Ampere (no TF32 there), else :func:`_float32_products`."""
    return _float32_products() if _capability(device)[0] >= 8 else "'ieee'"


_FLASH_OPTIONS: KernelOptions = {"BACKEND": "FLASH"}
"""torch's FlashAttention-4 lowering of FlexAttention (torch >= 2.10, with
the ``flash-attn-4`` package)."""

_FLASH_MIN_FLOPS = {False: 0.4e12, True: 0.13e12}
"""Useful forward FLOPs of a call above which the FLASH backend beats the
Triton kernel, for inference (False) and training (True). Measured on an
H200, bf16, 12 heads of 64 (``bench_kernels.py --parts fa4``), single
calls: FLASH has a fixed cost of 0.49 ms forward (1.17 ms forward and
backward) against Triton's 0.26 (0.72), and runs 1.3x (1.55x forward and
backward) as fast past it: 3.63 against 4.34 ms forward, 11.6 against 16.8
forward and backward at 65k AB-UPT tokens, 0.55 against 0.34 and 1.38
against 1.03 at 10k. The two lines cross at these FLOPs."""


@functools.cache
def _torch_lowers_flash() -> bool:
    """This torch has FlexAttention's FLASH lowering (>= 2.10)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch._inductor.kernel.flex.flex_flash_attention") is not None
    except ModuleNotFoundError:
        return False


def _flash_backend(inputs: AttentionInputs) -> bool:
    """Whether this call runs on FlashAttention 4 (torch's FLASH backend):
    half precision, no key padding or ALiBi (plain masks only, the cases
    measured), where :func:`patternc.nn.executors.flash4.usable` says it
    runs, and past :data:`_FLASH_MIN_FLOPS` of useful work."""
    q = inputs.q
    if (
        q.dtype not in (torch.float16, torch.bfloat16)
        or inputs.key_padding_mask is not None
        or inputs.alibi_slopes is not None
    ):
        return False
    if not flash4.usable(q.device, q.shape[-1]) or not _torch_lowers_flash():
        return False
    batch, _, heads, dim = q.shape
    training = torch.is_grad_enabled() and (
        q.requires_grad or inputs.k.requires_grad or inputs.v.requires_grad
    )
    flops = 4 * batch * heads * dim * inputs.layout.allowed_entries
    return flops >= _FLASH_MIN_FLOPS[training]


def kernel_of(inputs: AttentionInputs) -> str:
    """What :func:`run_flex` runs these inputs on (eagerly): ``"flash"``
    (FlashAttention 4), ``"triton"``, or ``"batched"`` where it falls back."""
    if _fallback_reason(inputs.q, inputs.dropout_p) is not None:
        return "batched"
    return "flash" if _flash_backend(inputs) else "triton"


def _kernel_options(q: Tensor) -> KernelOptions | None:
    """The tiles measured best for this dtype, head size and GPU, and float32's
    product precision (None: torch's own everywhere)."""
    if not q.is_cuda or torch.version.hip:
        return None
    hopper = _capability(q.device)[0] == 9
    head_dim = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16):
        if head_dim > 128:
            return None
        return _HOPPER_HALF_OPTIONS if hopper and head_dim <= 64 else _HALF_KERNEL_OPTIONS
    if q.dtype != torch.float32:
        return None
    return _FLOAT32_OPTIONS[float32_products(q.device), hopper and head_dim == 64]


_FLOAT32_OPTIONS: dict[tuple[str, bool], KernelOptions] = {
    (products, tiled): {"FLOAT32_PRECISION": products, **(tiles if tiled else {})}
    for products, tiles in _HOPPER_FLOAT32_TILES.items()
    for tiled in (True, False)
}
"""(product precision, Hopper tiles) -> float32's options: one dict per
choice, so calls hand the compiled graph the same options."""


def flex_tables(
    layout: Layout,
    cache_lengths: Mapping[str, int],
    device: torch.device,
    block_size: int = BLOCK_SIZE,
    positions: bool = False,
) -> FlexTables:
    """The layout's device tables, cached per (layout, cache lengths, device,
    block size, whether positions are built)."""
    key = _tables_key(layout, cache_lengths, device, block_size, positions)
    build = functools.partial(FlexTables.build, layout, cache_lengths, device, block_size, positions)
    return TABLES.get(key, build, traceable=True)


def _tables_key(
    layout: Layout, cache_lengths: Mapping[str, int], device: torch.device, block_size: int, positions: bool
) -> tuple[object, ...]:
    return ("flex tables", layout, tuple(sorted(cache_lengths.items())), device, block_size, positions)


def _block_mask(tables: FlexTables, key_padding_mask: Tensor | None, key: tuple[Any, ...]) -> BlockMask:
    global _builds
    if key_padding_mask is not None:  # the padding differs per batch: not cached
        _builds += 1
        return tables.block_mask(key_padding_mask)
    return _stored_block_mask("flex block mask", key, tables.block_mask)


def _flash_block_mask(tables: FlexTables, key: tuple[Any, ...]) -> BlockMask:
    """The block mask for the FLASH backend: its ``mask_mod`` reads int32
    group tables (FlashAttention 4's generated mask code stores indices as
    int32 and refuses int64 ones: "Type mismatch, store Int64 to Tensor with
    element type Int32")."""

    def narrow() -> BlockMask:
        return dataclasses.replace(
            tables, q_group=tables.q_group.int(), kv_group=tables.kv_group.int()
        ).block_mask()

    return _stored_block_mask("flex flash block mask", key, narrow)


def _stored_block_mask(kind: str, key: tuple[Any, ...], build: Callable[[], BlockMask]) -> BlockMask:
    """A block mask kept in :data:`TABLES` (traceable), counted when built."""

    def counted() -> BlockMask:
        global _builds
        _builds += 1
        return build()

    return TABLES.get((kind, *key), counted, traceable=True)


def _score_mod(tables: FlexTables, slopes: Tensor | None) -> ScoreMod | None:
    """ALiBi's ``score_mod``, one closure per (tables, slopes) so the compiled
    kernel is reused across calls (a new closure would recompile)."""
    if slopes is None:
        return None
    key = ("flex score mod", id(tables), slopes.data_ptr(), slopes.device, tuple(slopes.shape))
    owner, score_mod = TABLES.get(key, lambda: (tables, tables.alibi_score_mod(slopes)))
    if owner is not tables:  # an id reused after the old tables were freed
        owner, score_mod = tables, tables.alibi_score_mod(slopes)
    return score_mod


def _fallback_reason(q: Tensor, dropout_p: float) -> str | None:
    if dropout_p > 0:
        return "attention dropout (FlexAttention has none)"
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        return "gradients on CPU (torch's FlexAttention has no CPU backward)"
    if q.device.type == "cpu" and q.shape[2] == 1:
        # the graph around the kernel ends in the guard's pointwise re-poisoning
        # of its output; with one head that reads the output at the index it
        # writes, so Inductor fuses it into the C++ FlexAttention template,
        # which then raises "Unsupported for `epilogue_nodes`" (torch 2.13)
        return "one head on CPU (Inductor's CPU FlexAttention kernel fails to compile for it)"
    if q.device.type == "cuda" and q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]} < 16 (FlexAttention's GPU kernels need at least 16)"
    return None


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, length, H, D]`` zero-padded (no copy when ``N`` is ``length``)."""
    return t if t.shape[1] == length else F.pad(t, (0, 0, 0, 0, 0, length - t.shape[1]))


def _pad_heads_first(t: Tensor, length: int) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, H, length, D]`` zero-padded: the kernel's
    layout, for benchmarks that time the kernel alone."""
    return _pad_tokens(t, length).transpose(1, 2)


def run_flex(inputs: AttentionInputs, block_size: int = BLOCK_SIZE) -> Tensor:
    q, k, v, layout, cache = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.cache
    key_padding_mask, dropout_p, scale = inputs.key_padding_mask, inputs.dropout_p, inputs.scale
    reason = _fallback_reason(q, dropout_p)
    if reason is not None:
        return run_as_batched(inputs, "flex", reason, _warned)
    lengths = {g: cache[g][0].shape[1] for g in layout.cached_groups}
    slopes = inputs.alibi_slopes
    if _compiling() and (
        key_padding_mask is not None
        or TABLES.stored(_tables_key(layout, lengths, q.device, block_size, slopes is not None)) is None
    ):
        # inside a user's torch.compile, with tables no eager call stored (a
        # layout not run eagerly; a padding's block mask is built per call):
        # computed in the user's graph, Inductor cannot lower flex_attention
        # on them (see patternc.nn.tables)
        return run_batched(inputs)
    tables = flex_tables(layout, lengths, q.device, block_size, positions=slopes is not None)
    if layout.cached_groups:
        k = torch.cat([k, *(cache[g][0] for g in layout.cached_groups)], dim=1)
        v = torch.cat([v, *(cache[g][1] for g in layout.cached_groups)], dim=1)
    padding = None
    if key_padding_mask is not None:
        padding = F.pad(key_padding_mask, (0, tables.kv_len - key_padding_mask.shape[1]), value=False)
    key = (layout, tuple(sorted(lengths.items())), q.device, block_size, slopes is not None)
    flash = _flash_backend(inputs)
    n_queries = q.shape[1]
    args = (
        _pad_tokens(q, tables.q_len),
        _pad_tokens(k, tables.kv_len),
        _pad_tokens(v, tables.kv_len),
        _flash_block_mask(tables, key) if flash else _block_mask(tables, padding, key),
        _score_mod(tables, slopes),
        scale,
        _FLASH_OPTIONS if flash else _kernel_options(q),
    )
    # a key padding mask masks keys inside blocks; on CPU the guard always
    # runs: Inductor's CPU kernel drops a NaN score (a NaN key) in a full
    # block, where the GPU kernel and separate calls give NaN; on FLASH too
    # (its handling of a NaN score is not checked)
    guarded = padding is not None or tables.needs_value_guard or q.device.type != "cuda" or flash
    guard_tables = (tables.q_group, tables.kv_group, tables.allowed) if guarded else ()
    try:
        out = _attend_fn(guarded)(*args, *guard_tables)
        if not guarded:
            out = out.transpose(1, 2)
    except Exception as error:
        if not _past_recompile_limit(error):
            raise
        setting, limit = _recompile_limit()
        reason = (
            f"a shape past Dynamo's recompile limit ({limit} kernels; raise "
            f"torch._dynamo.config.{setting} to compile more)"
        )
        return run_as_batched(inputs, "flex", reason, _warned)
    return out if out.shape[1] == n_queries else out[:, :n_queries]


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


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    score_mod: ScoreMod | None,
    scale: float | None,
    kernel_options: KernelOptions | None,
    q_group: Tensor,
    kv_group: Tensor,
    allowed: Tensor,
) -> Tensor:
    """:func:`_attend_unguarded` with non-finite value rows zeroed before the
    kernel and NaN put back after it where separate attention calls would
    have it, for layouts whose blocks mix groups; ``[B, N, H, D]`` out. The
    tables (``q_group``, ``kv_group``, ``allowed``) are those of
    :class:`~patternc.nn.flexmask.FlexTables`."""
    v, bad = _finite_values(k, v)
    out = _attend_unguarded(q, k, v, block_mask, score_mod, scale, kernel_options).transpose(1, 2)
    return _poison(out, bad, q_group, kv_group, allowed)


def _finite_values(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """V with the rows of non-finite tokens zeroed, and which tokens those
    are (``[B, Nk, H]``). A partial block multiplies masked keys' values by
    weight 0, and ``0 * NaN`` is NaN: left in, a bad value row would reach
    queries of other groups. Keys stay as they are: a masked score is
    replaced by ``-inf``, NaN or not. Rows are tested through their float32
    sums (two reductions, no full-size test): a row whose values sum past
    float32's range counts as non-finite."""
    bad = ~torch.isfinite(k.sum(-1, dtype=torch.float32) + v.sum(-1, dtype=torch.float32))
    return v.masked_fill(bad[..., None], 0.0), bad


def _poison(out: Tensor, bad: Tensor, q_group: Tensor, kv_group: Tensor, allowed: Tensor) -> Tensor:
    """NaN for the queries whose groups attend to a group holding a
    non-finite key (what separate attention calls give), without a host sync.

    Bad tokens are counted per group by a matmul with the keys' one-hot
    group matrix, not scattered: a scatter would send every key's flag to
    one of a few group slots, each an atomic update on the GPU. (With the
    scatter, the whole guard cost 0.44 ms of a 5.1 ms forward at 65k tokens
    on an H200; the matmul's share is not measured yet.)"""
    n_keys = bad.shape[1]
    n_groups = allowed.shape[0]
    key_groups = kv_group[:n_keys, None] == torch.arange(n_groups, device=out.device)  # [Nk, G]
    bad_groups = bad.transpose(1, 2).to(torch.float32) @ key_groups.to(torch.float32)  # [B, H, G]: counts
    reads = allowed[q_group[: out.shape[1]]].to(torch.float32)  # [Nq, G]
    poisoned = (bad_groups @ reads.T) > 0  # [B, H, Nq]
    return out.masked_fill(poisoned.transpose(1, 2)[..., None], float("nan"))
