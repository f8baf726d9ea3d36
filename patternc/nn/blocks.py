"""Transformer and perceiver blocks, tied and untied, driven by compiled patterns.

Both are pre-norm residual blocks::

    x = x + drop_path(layer_scale(attention(norm(x), ...)))
    x = x + drop_path(layer_scale(mlp(norm(x))))

The untied blocks give each token type its own attention projections and MLP
(norms stay shared); attention still runs across all tokens through the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from patternc.configs import (
    LinearProjectionConfig,
    PerceiverBlockConfig,
    TransformerBlockConfig,
    UntiedLinearConfig,
    UntiedPerceiverBlockConfig,
    UntiedTransformerBlockConfig,
)
from patternc.nn.attention import MixedAttention, init_linear, merge_heads
from patternc.nn.layers import MLP, DropPath, LayerScale
from patternc.nn.rope import apply_rope
from patternc.nn.untied import (
    TypeBinding,
    UntiedLinear,
    UntiedMixedAttention,
    UntiedMLP,
    UntiedPath,
    check_types,
    plan_group_types,
    type_runs,
)
from patternc.plan import Plan
from patternc.schemas import AttentionPattern, TokenSpecs, as_token_specs

__all__ = [
    "PerceiverAttention",
    "PerceiverBlock",
    "TransformerBlock",
    "UntiedPerceiverBlock",
    "UntiedTransformerBlock",
]

Patterns = Union[Plan, Sequence[AttentionPattern]]


def _branch(dim: int, config: TransformerBlockConfig) -> tuple[nn.Module, nn.Module]:
    scale: nn.Module = (
        LayerScale(dim, config.layer_scale) if config.layer_scale is not None else nn.Identity()
    )
    return scale, DropPath(config.drop_path)


_ATTN_KWARGS = ("token_specs", "attention_patterns", "key_padding_mask", "freqs")


class TransformerBlock(nn.Module):
    """Pre-norm block: ``MixedAttention`` over the patterns, then an ``MLP``.

    With ``condition_dim``, a conditioning vector ``condition`` (``[B, C]``,
    or ``[B, N, C]`` per token) modulates each branch: ``norm(x) * (1 + scale)
    + shift`` in, ``x + (1 + gate) * branch`` out, the six vectors from one
    linear that starts at zero, so a fresh conditioned block computes what the
    unconditioned one does.
    """

    def __init__(self, config: TransformerBlockConfig) -> None:
        super().__init__()
        self.config = config
        self.norm1 = nn.LayerNorm(config.hidden_dim, eps=config.eps)
        self.attention: MixedAttention = MixedAttention(config.attention())
        self.scale1, self.drop1 = _branch(config.hidden_dim, config)
        self.norm2 = nn.LayerNorm(config.hidden_dim, eps=config.eps)
        self.mlp: nn.Module = MLP(config.mlp())
        self.scale2, self.drop2 = _branch(config.hidden_dim, config)
        self.modulation: nn.Linear | None = None
        if config.condition_dim is not None:
            self.modulation = nn.Linear(config.condition_dim, 6 * config.hidden_dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def _mlp(self, x: Tensor, specs: TokenSpecs, patterns: Patterns) -> Tensor:
        return self.mlp(x)  # type: ignore[no-any-return]

    def forward(
        self,
        x: Tensor,
        token_specs: TokenSpecs | None = None,
        attention_patterns: Patterns | None = None,
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        *,
        condition: Tensor | None = None,
        attn_kwargs: Mapping[str, object] | None = None,
    ) -> Tensor:
        """``block(x, token_specs, patterns, ...)``, or the seed's form
        ``block(x, attn_kwargs={"token_specs": ..., "attention_patterns": ...}, condition=c)``."""
        if attn_kwargs is not None:
            unknown = sorted(set(attn_kwargs) - set(_ATTN_KWARGS))
            if unknown or token_specs is not None or attention_patterns is not None:
                raise ValueError(
                    f"attn_kwargs takes {list(_ATTN_KWARGS)} (got {sorted(attn_kwargs)}), and not beside "
                    "positional token_specs/attention_patterns: give them one way"
                )
            token_specs = attn_kwargs.get("token_specs")  # type: ignore[assignment]
            attention_patterns = attn_kwargs.get("attention_patterns")  # type: ignore[assignment]
            key_padding_mask = attn_kwargs.get("key_padding_mask")  # type: ignore[assignment]
            freqs = attn_kwargs.get("freqs")  # type: ignore[assignment]
        if token_specs is None or attention_patterns is None:
            raise ValueError("a block needs token_specs and attention_patterns (or attn_kwargs with them)")
        shift1, scale1, gate1, shift2, scale2, gate2 = self._modulation(x, condition)
        h = self.norm1(x) * (1 + scale1) + shift1
        attended, _ = self.attention(h, token_specs, attention_patterns, key_padding_mask, freqs)
        x = x + (1 + gate1) * self.drop1(self.scale1(attended))
        h = self.norm2(x) * (1 + scale2) + shift2
        out: Tensor = x + (1 + gate2) * self.drop2(self.scale2(self._mlp(h, token_specs, attention_patterns)))
        return out

    def _modulation(self, x: Tensor, condition: Tensor | None) -> tuple[Tensor | float, ...]:
        if self.modulation is None:
            if condition is not None:
                raise ValueError("condition was given but this block has no conditioning: set condition_dim")
            return (0.0,) * 6
        if condition is None:
            raise ValueError(
                f"this block was built with condition_dim={self.config.condition_dim}: pass "
                f"condition=[batch, {self.config.condition_dim}]"
            )
        mod = self.modulation(condition)
        if mod.dim() == 2:
            mod = mod[:, None, :]
        return tuple(mod.chunk(6, dim=-1))


class UntiedTransformerBlock(TransformerBlock):
    """``TransformerBlock`` with per-type attention projections and MLP.

    ``types`` names the weight banks (``len == num_types``); group types come
    from the plan, else ``group_types``, else each group's domain.
    """

    def __init__(
        self,
        config: UntiedTransformerBlockConfig,
        types: Sequence[str] | TypeBinding | None = None,
        group_types: Mapping[str, str] | None = None,
        path: UntiedPath = "auto",
    ) -> None:
        super().__init__(config.transformer_block)
        self.untied_config = config
        self.types = check_types(types, config.num_types)
        self.group_types = dict(group_types or {})
        self.attention = UntiedMixedAttention(config.attention_config(), self.types, group_types, path)
        self.mlp = UntiedMLP(config.untied_mlp_config(), self.types, path)

    def _mlp(self, x: Tensor, specs: TokenSpecs, patterns: Patterns) -> Tensor:
        token_specs = as_token_specs(specs)
        group_types = plan_group_types(patterns, token_specs, self.group_types)
        return self.mlp(x, type_runs(token_specs, group_types, self.types))  # type: ignore[no-any-return]


class PerceiverAttention(nn.Module):
    """Cross-attention: queries from ``x``, keys/values from ``kv`` (one shared
    K/V projection of width ``kv_dim``). ``q_proj``/``out_proj`` may be untied.

    RoPE: ``q_freqs`` rotate the queries and ``kv_freqs`` the keys (complex,
    ``[N, D/2]`` or ``[B, N, D/2]``, see :func:`~patternc.nn.rope_frequencies`).
    KV cache: :meth:`project_kv` returns ``{"k", "v"}`` (``[B, H, M, D]``, keys
    after RoPE, the layout of :data:`~patternc.nn.KVCache` entries), which
    ``forward`` reads in place of ``kv`` (queries over new points against one
    encoded geometry, without projecting it again).
    """

    def __init__(
        self, config: PerceiverBlockConfig, q_proj: nn.Module | None = None, out_proj: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_dim // config.num_heads
        self.q_proj = q_proj or nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.kv_proj = nn.Linear(config.kv_width, 2 * config.hidden_dim, bias=config.bias)
        self.out_proj = out_proj or nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        zero_out = config.init_weights == "zero"  # the branch starts at zero (see InitWeightsMode)
        for layer in (self.q_proj, self.kv_proj, self.out_proj):
            if isinstance(layer, nn.Linear):
                init_linear(layer, config.init_weights, zero=zero_out and layer is self.out_proj)
        if zero_out and isinstance(self.out_proj, UntiedLinear):
            self.out_proj.reset_parameters(zero=True)

    def check_kv(self, kv: Tensor) -> None:
        """``kv``'s width against ``kv_dim``, with the fix in the message."""
        if kv.shape[-1] != self.config.kv_width:
            raise ValueError(
                f"kv has width {kv.shape[-1]} but this perceiver reads kv_dim={self.config.kv_width}; "
                "project kv to that width or build the block with kv_dim set to it"
            )

    def project_kv(self, kv: Tensor, kv_freqs: Tensor | None = None) -> dict[str, Tensor]:
        """``kv`` ``[B, M, kv_dim]`` -> ``{"k", "v"}``, each ``[B, H, M, D]``
        (keys rotated by ``kv_freqs``)."""
        self.check_kv(kv)
        k, v = self.kv_proj(kv).view(kv.shape[0], kv.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        if kv_freqs is not None:
            k = apply_rope(k, kv_freqs)
        return {"k": k.transpose(1, 2), "v": v.transpose(1, 2)}

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        q_freqs: Tensor | None = None,
        kv_freqs: Tensor | None = None,
        runs: object = None,
        kv_cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``x`` ``[B, N, hidden]`` attends to ``kv`` ``[B, M, kv_dim]``, or to
        ``kv_cache`` (from :meth:`project_kv`; then ``kv`` and ``kv_freqs`` are not given)."""
        batch, n, _ = x.shape
        q = (self.q_proj(x, runs) if runs is not None else self.q_proj(x)).view(
            batch, n, self.num_heads, self.head_dim
        )
        if q_freqs is not None:
            q = apply_rope(q, q_freqs)
        if kv_cache is not None:
            if kv is not None or kv_freqs is not None:
                raise ValueError(
                    "give kv (and kv_freqs) or kv_cache, not both: the cache holds projected keys"
                )
            cache = kv_cache
        elif kv is None:
            raise ValueError("a perceiver needs kv [batch, tokens, kv_dim], or kv_cache from project_kv(kv)")
        else:
            cache = self.project_kv(kv, kv_freqs)
        k, v = cache["k"], cache["v"]
        if k.dim() != 4 or k.shape[0] != batch or k.shape[1] != self.num_heads or k.shape[3] != self.head_dim:
            raise ValueError(
                f"kv_cache['k'] has shape {tuple(k.shape)}; expected [batch={batch}, heads={self.num_heads}, "
                f"tokens, head_dim={self.head_dim}] (what project_kv returns)"
            )
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k,
            v,
            attn_mask=mask,
            dropout_p=self.config.dropout if self.training else 0.0,
        ).transpose(1, 2)
        out = merge_heads(out)
        return self.out_proj(out, runs) if runs is not None else self.out_proj(out)  # type: ignore[no-any-return]


class PerceiverBlock(nn.Module):
    """Pre-norm perceiver block: ``x`` attends to ``kv``, then an MLP.

    ``q_freqs``/``kv_freqs`` apply RoPE to queries and keys. For many query
    batches against one ``kv`` (an encoded geometry), compute
    ``cache = block.key_values(kv, kv_freqs)`` once and call
    ``block(x, kv_cache=cache, ...)``: the same output without projecting
    ``kv`` again.

    With ``condition_dim``, ``condition`` (``[B, C]``) modulates the block as
    :class:`TransformerBlock`'s does (``norm(x) * (1 + scale) + shift`` into
    each branch, ``x + (1 + gate) * branch`` out), and also the normed ``kv``
    (its own scale and shift); the modulation starts at zero, so a fresh
    conditioned block computes what the unconditioned one does.
    """

    def __init__(self, config: PerceiverBlockConfig) -> None:
        super().__init__()
        self.config = config
        self.norm1 = nn.LayerNorm(config.hidden_dim, eps=config.eps)
        self.norm_kv = nn.LayerNorm(config.kv_width, eps=config.eps)
        self.attention = PerceiverAttention(config)
        self.scale1, self.drop1 = _branch(config.hidden_dim, config)
        self.norm2 = nn.LayerNorm(config.hidden_dim, eps=config.eps)
        self.mlp: nn.Module = MLP(config.mlp())
        self.scale2, self.drop2 = _branch(config.hidden_dim, config)
        self.modulation: nn.Linear | None = None
        if config.condition_dim is not None:
            self.modulation = nn.Linear(config.condition_dim, 6 * config.hidden_dim + 2 * config.kv_width)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def _runs(self, token_specs: TokenSpecs | None) -> object:
        return None

    def _modulation(self, condition: Tensor | None) -> tuple[Tensor | float, ...]:
        """``(shift1, scale1, gate1, shift2, scale2, gate2, shift_kv, scale_kv)``."""
        if self.modulation is None:
            if condition is not None:
                raise ValueError("condition was given but this block has no conditioning: set condition_dim")
            return (0.0,) * 8
        if condition is None:
            raise ValueError(
                f"this block was built with condition_dim={self.config.condition_dim}: pass "
                f"condition=[batch, {self.config.condition_dim}]"
            )
        if condition.dim() != 2:
            raise ValueError(
                "a perceiver block's condition is one vector per sample, "
                f"[batch, {self.config.condition_dim}], "
                f"got shape {tuple(condition.shape)} (it also modulates kv, whose tokens are not x's)"
            )
        mod = self.modulation(condition)[:, None, :]
        hidden, width = self.config.hidden_dim, self.config.kv_width
        return tuple(mod.split([hidden] * 6 + [width] * 2, dim=-1))

    def key_values(
        self, kv: Tensor, kv_freqs: Tensor | None = None, condition: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The K/V cache of ``kv`` for this block (normed, modulated by
        ``condition`` when the block is conditioned, projected, keys rotated)."""
        *_, shift_kv, scale_kv = self._modulation(condition)
        self.attention.check_kv(kv)
        return self.attention.project_kv(self.norm_kv(kv) * (1 + scale_kv) + shift_kv, kv_freqs)

    def forward(
        self,
        x: Tensor,
        kv: Tensor | None = None,
        token_specs: TokenSpecs | None = None,
        key_padding_mask: Tensor | None = None,
        *,
        q_freqs: Tensor | None = None,
        kv_freqs: Tensor | None = None,
        kv_cache: dict[str, Tensor] | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """``x``: ``[B, N, hidden]`` queries; ``kv``: ``[B, M, kv_dim]`` (or
        ``kv_cache`` from :meth:`key_values`); ``key_padding_mask``: ``[B, M]``
        (True = real); ``q_freqs``/``kv_freqs``: RoPE of queries and keys."""
        runs = self._runs(token_specs)
        shift1, scale1, gate1, shift2, scale2, gate2, shift_kv, scale_kv = self._modulation(condition)
        if kv_cache is None:
            if kv is None:
                raise ValueError("a perceiver block needs kv, or kv_cache from block.key_values(kv)")
            self.attention.check_kv(kv)
            kv = self.norm_kv(kv) * (1 + scale_kv) + shift_kv
        h = self.norm1(x) * (1 + scale1) + shift1
        attended = self.attention(
            h, kv, key_padding_mask, q_freqs=q_freqs, kv_freqs=kv_freqs, runs=runs, kv_cache=kv_cache
        )
        x = x + (1 + gate1) * self.drop1(self.scale1(attended))
        h = self.norm2(x) * (1 + scale2) + shift2
        branch = self.mlp(h, runs) if runs is not None else self.mlp(h)
        out: Tensor = x + (1 + gate2) * self.drop2(self.scale2(branch))
        return out


class UntiedPerceiverBlock(PerceiverBlock):
    """``PerceiverBlock`` with per-type Q and output projections and MLP; the
    K/V projection stays shared because it reads one geometry encoding.
    ``token_specs`` (required in ``forward``) says which groups ``x`` holds."""

    def __init__(
        self,
        config: UntiedPerceiverBlockConfig,
        types: Sequence[str] | TypeBinding | None = None,
        group_types: Mapping[str, str] | None = None,
        path: UntiedPath = "auto",
    ) -> None:
        block = config.perceiver_block_config
        super().__init__(block)
        self.untied_config = config
        self.types = check_types(types, config.num_types)
        self.group_types = dict(group_types or {})
        square = LinearProjectionConfig(
            input_dim=block.hidden_dim,
            output_dim=block.hidden_dim,
            bias=block.bias,
            init_weights=block.init_weights,
        )
        untied = UntiedLinearConfig(linear_projection=square, num_types=config.num_types)
        self.attention = PerceiverAttention(
            block,
            q_proj=UntiedLinear(untied, self.types, path),
            out_proj=UntiedLinear(untied, self.types, path),
        )
        self.mlp = UntiedMLP(config.untied_mlp_config(), self.types, path)

    def _runs(self, token_specs: TokenSpecs | None) -> object:
        if token_specs is None:
            raise ValueError("UntiedPerceiverBlock needs token_specs to pick each token's weights")
        return type_runs(as_token_specs(token_specs), self.group_types, self.types)
