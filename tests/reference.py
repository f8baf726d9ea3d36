"""A float64 dense-mask reference for attention modules, written independently
of patternc's schedules and executors: per-token group names, a mask built
straight from the pattern list, and an explicit softmax."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import patternc
from patternc import AttentionPattern, TokenSpec
from patternc.modifiers import Neighbourhood
from patternc.nn import DotProductAttention


def rotate(x: Tensor, freqs: Tensor) -> Tensor:
    """RoPE via complex multiplication; x [B, N, H, D], freqs [N, D/2] or [B, N, D/2]."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    f = freqs.to(torch.complex128)
    f = f[None, :, None, :] if f.dim() == 2 else f[:, :, None, :]
    return torch.view_as_real(pairs * f).flatten(-2)


def allowed_mask(
    specs: Sequence[TokenSpec], patterns: Sequence[AttentionPattern], cache_lengths: dict[str, int]
) -> Tensor:
    query_names = [s.name for s in specs if s.size is not None for _ in range(s.size)]
    key_names = query_names + [
        s.name for s in specs if s.size is None for _ in range(cache_lengths.get(s.name, 0))
    ]
    mask = torch.zeros(len(query_names), len(key_names), dtype=torch.bool)
    for pattern in patterns:
        q = torch.tensor([n in pattern.query_tokens for n in query_names])
        k = torch.tensor([n in pattern.key_value_tokens for n in key_names])
        mask |= q[:, None] & k[None, :]
    return mask


def reference_attention(
    module: DotProductAttention,
    x: Tensor,
    specs: Sequence[TokenSpec],
    patterns: Sequence[AttentionPattern],
    key_padding_mask: Tensor | None = None,
    freqs: Tensor | None = None,
    kv_cache: dict[str, dict[str, Tensor]] | None = None,
    qkv_fn: Callable[[Tensor], Tensor] | None = None,
    out_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Output of ``module`` (MixedAttention semantics) in float64.
    ``qkv_fn``/``out_fn`` replace the module's projections (untied layers)."""
    x = x.double()
    heads, dim = module.num_heads, module.head_dim
    if qkv_fn is None:
        weight, bias = module.qkv.weight.double(), module.qkv.bias
        qkv = x @ weight.T + (bias.double() if bias is not None else 0)
    else:
        qkv = qkv_fn(x)
    b, n, _ = x.shape
    q, k, v = qkv.view(b, n, 3, heads, dim).unbind(2)
    if isinstance(module.q_norm, torch.nn.LayerNorm):
        qn, kn = module.q_norm, module.k_norm
        q = F.layer_norm(q, (dim,), qn.weight.double(), qn.bias.double(), qn.eps)
        k = F.layer_norm(k, (dim,), kn.weight.double(), kn.bias.double(), kn.eps)  # type: ignore[arg-type]
    if freqs is not None:
        q, k = rotate(q, freqs), rotate(k, freqs)
    lengths: dict[str, int] = {}
    cached_k, cached_v = [], []
    for spec in specs:
        if spec.size is None and kv_cache is not None and spec.name in kv_cache:
            entry = kv_cache[spec.name]
            cached_k.append(entry["k"].double().transpose(1, 2))
            cached_v.append(entry["v"].double().transpose(1, 2))
            lengths[spec.name] = entry["k"].shape[2]
    keys = torch.cat([k, *cached_k], dim=1)
    values = torch.cat([v, *cached_v], dim=1)
    mask = allowed_mask(specs, patterns, lengths)[None, None]  # [1, 1, N, Nk]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / dim**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", weights, values).reshape(b, n, heads * dim)
    if out_fn is not None:
        return out_fn(out)
    proj_bias = module.proj.bias
    return out @ module.proj.weight.double().T + (proj_bias.double() if proj_bias is not None else 0)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (0 when both are zero)."""
    denom = ref.detach().double().norm()
    diff = (out.detach().double() - ref.detach().double()).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def language_mask(plan: patternc.Plan, sizes: dict[str, int]) -> Tensor:
    """``[N, N]`` bool from the language's definition, not from patternc's
    layouts: query token ``i`` of group G sees key token ``j`` of group H iff
    G's rule lists H, and, with that key group's modifiers and ``d = j - i``
    (positions within groups, or in the whole input under ``across``):
    ``d <= 0`` under ``causal``, ``|d| < N`` under ``window N``, ``d >= -L``
    under ``back L``, ``d <= R`` under ``ahead R`` and ``d % D == 0`` under
    ``dilate D``; under a neighbourhood on a shaped group, the positions
    are row-major coordinates on the shape and on every axis the key's
    coordinate is within ``N`` of the query's (``near N``) or among the ``K``
    from ``clamp(q - K // 2, 0, n - K)`` (``kernel K``)."""
    bound = plan.bind(list(sizes))
    keys_of = {q: {k.name: k.modifiers for k in rule.keys} for rule in bound.rules for q in rule.queries}
    names = [g for g in bound.groups for _ in range(sizes[g])]
    positions = [i for g in bound.groups for i in range(sizes[g])]
    n = len(names)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        keys = keys_of[names[a]]
        for b in range(n):
            mods = keys.get(names[b])
            if mods is None:
                continue
            if mods.grid is not None:
                mask[a, b] = _in_neighbourhood(mods.grid, positions[a], positions[b])
                continue
            d = b - a if mods.across else positions[b] - positions[a]
            ok = not (mods.causal and d > 0)
            ok &= mods.window is None or abs(d) < mods.window
            ok &= mods.back is None or d >= -mods.back
            ok &= mods.ahead is None or d <= mods.ahead
            ok &= d % mods.dilation == 0
            mask[a, b] = ok
    return mask


def _in_neighbourhood(grid: Neighbourhood, q: int, k: int) -> bool:
    """Whether key position ``k`` is in the window of query position ``q``
    (both within the shaped group), axis by axis from the last."""
    for n, size in zip(reversed(grid.shape), reversed(grid.sizes)):
        q, q_at = divmod(q, n)
        k, k_at = divmod(k, n)
        if grid.kind == "near":
            if abs(k_at - q_at) > size:
                return False
        else:
            first = min(max(q_at - size // 2, 0), n - size)
            if not first <= k_at < first + size:
                return False
    return True


def reference_pattern_attention(
    module: DotProductAttention,
    x: Tensor,
    plan: patternc.Plan,
    sizes: dict[str, int],
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """float64 output of a ``PatternAttention``'s attention under ``plan``
    (explicit softmax over :func:`language_mask`); differentiable in ``x``."""
    return masked_attention(module, x, language_mask(plan, sizes), key_padding_mask)


def masked_attention(
    module: DotProductAttention, x: Tensor, allowed: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """float64 output of a ``PatternAttention``'s weights under the ``[N, N]``
    bool mask ``allowed`` (explicit softmax; rows with no key give zeros)."""
    heads, dim = module.num_heads, module.head_dim
    b, n, _ = x.shape
    qkv = x @ module.qkv.weight.double().T + module.qkv.bias.double()
    q, k, v = qkv.view(b, n, 3, heads, dim).unbind(2)
    mask = allowed.to(x.device)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, heads * dim)
    return out @ module.proj.weight.double().T + module.proj.bias.double()
