"""``MixedAttention`` with the peer's layout and calls, run by patternc's attention core
(``noether.modeling.modules.attention.anchor_attention.mixed``).

The module *is* a :class:`patternc.nn.MixedAttention`: the patterns are
checked by patternc's checks (once per layout) and run by its executor
(``config.implementation``, ``batched`` by default); only the projections
are the peer's four ``nn.Linear`` layers ``q``, ``k``, ``v``, ``proj``, so a
peer checkpoint loads as it is (``load_state_dict(..., strict=True)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import patternc
from patternc import Layout
from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionConfig,
    AttentionPattern,
    MixedAttentionConfig,
    TokenSpec,
)
from patternc.compat.noether.modeling.functional.init import apply_init_method
from patternc.compat.noether.modeling.functional.rope import rope
from patternc.compat.noether.modeling.modules.attention.dot_product import fused, split_heads
from patternc.nn import MixedAttention as _CoreMixedAttention

__all__ = ["MixedAttention", "as_patterns", "as_specs", "validate_inputs"]

KVCache = dict[str, dict[str, Tensor]]


def as_specs(token_specs: Iterable[Any]) -> list[TokenSpec]:
    """The peer's ``TokenSpec`` objects (or anything with ``name`` and ``size``,
    or ``{name: size}`` dicts) as this package's ``TokenSpec``."""
    out: list[TokenSpec] = []
    for spec in token_specs:
        if isinstance(spec, TokenSpec):
            out.append(spec)
        elif isinstance(spec, dict):
            out.append(TokenSpec.from_dict(spec))  # type: ignore[arg-type]
        else:
            out.append(TokenSpec(name=spec.name, size=spec.size))
    return out


def as_patterns(patterns: Iterable[Any]) -> list[AttentionPattern]:
    """Attention patterns (the peer's or patternc's) as patternc's."""
    return [
        p
        if isinstance(p, AttentionPattern)
        else AttentionPattern(query_tokens=tuple(p.query_tokens), key_value_tokens=tuple(p.key_value_tokens))
        for p in patterns
    ]


def validate_inputs(
    x: Tensor,
    input_specs: Sequence[TokenSpec],
    patterns: Sequence[AttentionPattern],
    key_padding_mask: Tensor | None,
    freqs: Tensor | None,
    use_rope: bool,
    cached: set[str],
) -> None:
    """The peer's checks of a call, with its messages (code written against the
    peer may match them); patternc's own checks of the patterns run after."""
    if use_rope != (freqs is not None):
        raise ValueError(f"RoPE usage mismatch: self.use_rope = {use_rope}, but freqs is {freqs is not None}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}.")
        if key_padding_mask.ndim != 2:
            raise ValueError(
                "key_padding_mask must be 2D with shape (batch_size, n_tokens), got shape "
                f"{tuple(key_padding_mask.shape)}."
            )
        if key_padding_mask.shape[1] != x.shape[1]:
            raise ValueError(
                f"key_padding_mask n_tokens dim ({key_padding_mask.shape[1]}) must match x sequence length "
                f"({x.shape[1]})."
            )
    total = sum(s.size or 0 for s in input_specs)
    if total != x.shape[1]:
        raise ValueError(f"Token specs total size {total} != tensor size {x.shape[1]}")
    names = {s.name for s in input_specs} | cached
    queries = [name for p in patterns for name in p.query_tokens]
    if len(queries) != len(set(queries)):
        raise ValueError("A token type cannot be a query in multiple attention patterns.")
    if set(queries) != names:
        raise ValueError("The set of query tokens must exactly match the set of tokens in token_specs.")
    for p in patterns:
        for name in p.key_value_tokens:
            if name not in names:
                raise ValueError(
                    f"Token '{name}' in `key_value_tokens` of an attention pattern "
                    "is not defined in `token_specs`."
                )


class MixedAttention(_CoreMixedAttention):
    """Attention along token-group patterns, the peer's ``MixedAttention``.

    ``forward(x, token_specs, attention_patterns, key_padding_mask=None,
    freqs=None, kv_cache=None)`` returns ``(out, new_kv_cache)``: the new
    cache holds ``{"k", "v"}`` (``[B, H, N, D]``, keys after RoPE) of every
    input group whose name contains ``_anchor``, as the peer's does, or is None
    when some group (``size=None``) was read from ``kv_cache``. ``attention_patterns``
    may also be a compiled :class:`patternc.Plan`.

    Differences from the peer: in training, dropout acts on the attention
    weights only (as in the peer), through patternc's executor, whose random
    draws differ; ``implementation`` (an extra config field) picks patternc's
    executor.
    """

    def __init__(self, config: AttentionConfig) -> None:
        peer = MixedAttentionConfig(**config.model_dump())
        implementation = (peer.model_extra or {}).get("implementation", "batched")
        core = patternc.MixedAttentionConfig(
            hidden_dim=peer.hidden_dim,
            num_heads=peer.num_heads,
            use_rope=peer.use_rope,
            dropout=peer.dropout,
            bias=peer.bias,
            init_weights="torch",
            implementation=implementation,
        )
        super().__init__(core)
        # the peer's parameters: four square projections instead of a fused qkv
        del self.qkv, self.proj
        hidden = peer.hidden_dim
        self.init_weights = peer.init_weights
        self.output_dropout = 0.0  # the peer's MixedAttention does not drop its output
        self.proj_dropout = nn.Dropout(peer.dropout)
        self.q = nn.Linear(hidden, hidden, bias=peer.bias)
        self.k = nn.Linear(hidden, hidden, bias=peer.bias)
        self.v = nn.Linear(hidden, hidden, bias=peer.bias)
        self.proj = nn.Linear(hidden, hidden, bias=peer.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if "q" not in self._modules:  # called by the core's constructor, before the projections exist
            return
        apply_init_method(self, self.proj.weight, self.init_weights)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the peer's keys are this module's own: no fusing of q/k/v into qkv
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    # the core's projection hooks: the peer's q/k/v, fused as the peer fuses them
    def _project_in(self, x: Tensor, layout: Layout, patterns: object) -> Tensor:
        return fused(x, (self.q, self.k, self.v))

    def _project_apart(self, x: Tensor, layout: Layout, patterns: object) -> tuple[Tensor, Tensor] | None:
        return None

    def _project_back(self, out: Tensor, layout: Layout, patterns: object) -> Tensor:
        projected: Tensor = self.proj(out)
        return projected

    def _anchor_key_values(self, x: Tensor, specs: Sequence[TokenSpec], freqs: Tensor | None) -> KVCache:
        """K/V of each ``_anchor`` group, projected from ``x`` (for groups the
        patterns never read as keys, which the core's cache does not hold)."""
        k, v = (
            split_heads(t, self.num_heads)
            for t in F.linear(
                x,
                torch.cat([self.k.weight, self.v.weight]),
                None if self.k.bias is None else torch.cat([self.k.bias, self.v.bias]),
            ).chunk(2, dim=-1)
        )
        if self.use_rope and freqs is not None:
            k = rope(k, freqs)
        out, start = {}, 0
        for spec in specs:
            size = spec.size or 0
            out[spec.name] = {"k": k[:, :, start : start + size], "v": v[:, :, start : start + size]}
            start += size
        return out

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        token_specs: Sequence[TokenSpec] | Any,
        attention_patterns: Sequence[AttentionPattern] | patternc.Plan,
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        specs = as_specs(token_specs)
        out, cache = self._attend_specs(x, specs, attention_patterns, key_padding_mask, freqs, kv_cache)
        if cache is None:
            return out, None
        input_specs = [s for s in specs if s.size is not None]
        anchors = [s for s in input_specs if "_anchor" in s.name]
        if any(s.name not in cache for s in anchors):
            cache = {**self._anchor_key_values(x, input_specs, freqs), **cache}
        return out, {s.name: cache[s.name] for s in anchors}

    def _attend_specs(
        self,
        x: Tensor,
        specs: list[TokenSpec],
        attention_patterns: Sequence[AttentionPattern] | patternc.Plan,
        key_padding_mask: Tensor | None,
        freqs: Tensor | None,
        kv_cache: KVCache | None,
    ) -> tuple[Tensor, KVCache | None]:
        """The peer's checks, then patternc's attention: ``(out, core cache)``."""
        input_specs = [s for s in specs if s.size is not None]
        cached = {s.name for s in specs if s.size is None}
        patterns: Sequence[AttentionPattern] | patternc.Plan = attention_patterns
        if not isinstance(attention_patterns, patternc.Plan):
            patterns = as_patterns(attention_patterns)
            validate_inputs(x, input_specs, patterns, key_padding_mask, freqs, self.use_rope, cached)
        if cached:
            if not kv_cache:
                raise ValueError("Cannot use cached tokens: kv_cache is empty.")
            for name in sorted(cached):
                if name not in kv_cache:
                    raise ValueError(f"Cached token '{name}' not found in kv_cache.")
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is not supported when using KV cache.")
        result: tuple[Tensor, KVCache | None] = super().forward(
            x, specs, patterns, key_padding_mask, freqs, kv_cache
        )
        return result
