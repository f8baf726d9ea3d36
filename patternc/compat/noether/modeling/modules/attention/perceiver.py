"""``PerceiverAttention`` with the peer's layout (``noether.modeling.modules.attention.perceiver``):
``q``, ``k``, ``v``, ``proj``; queries from one input, keys/values from another."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.attention import AttentionConfig, PerceiverAttentionConfig
from patternc.compat.noether.modeling.functional.init import apply_init_method
from patternc.compat.noether.modeling.functional.rope import rope
from patternc.compat.noether.modeling.modules.attention.dot_product import fused, merge_heads, split_heads

__all__ = ["PerceiverAttention"]


class PerceiverAttention(nn.Module):
    """Cross-attention. ``forward(q, kv=None, attn_mask=None, q_freqs=None,
    k_freqs=None, kv_cache=None)`` returns ``(out, new_kv_cache)``: the cache is
    ``{"k", "v"}`` (``[B, H, M, D]``, keys after RoPE) when computed from ``kv``,
    None when read from ``kv_cache``."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        config = PerceiverAttentionConfig(**config.model_dump())
        assert config.kv_dim is not None  # set by the validator
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_dim // config.num_heads
        self.init_weights = config.init_weights
        self.use_rope = config.use_rope
        self.k = nn.Linear(config.kv_dim, config.hidden_dim, bias=config.bias)
        self.v = nn.Linear(config.kv_dim, config.hidden_dim, bias=config.bias)
        self.q = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.proj = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.dropout = config.dropout
        self.proj_dropout = nn.Dropout(config.dropout)
        apply_init_method(self, self.proj.weight, self.init_weights)

    def _project_q(self, q: Tensor, token_specs: object) -> Tensor:
        out: Tensor = self.q(q)
        return out

    def _project_out(self, x: Tensor, token_specs: object) -> Tensor:
        out: Tensor = self.proj(x)
        return out

    def _attend(
        self,
        q: Tensor,
        token_specs: object,
        kv: Tensor | None,
        attn_mask: Tensor | None,
        q_freqs: Tensor | None,
        k_freqs: Tensor | None,
        kv_cache: dict[str, Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        query = split_heads(self._project_q(q, token_specs), self.num_heads)
        new_cache: dict[str, Tensor] | None
        if kv_cache is not None:
            k, v, new_cache = kv_cache["k"], kv_cache["v"], None
        else:
            if kv is None:
                raise ValueError("Either kv or kv_cache must be provided.")
            k, v = (split_heads(t, self.num_heads) for t in fused(kv, (self.k, self.v)).chunk(2, dim=-1))
            if self.use_rope:
                if k_freqs is None:
                    raise ValueError("use_rope=True needs k_freqs for the keys")
                k = rope(k, k_freqs)
            new_cache = {"k": k, "v": v}
        if self.use_rope:
            if q_freqs is None:
                raise ValueError("use_rope=True needs q_freqs for the queries")
            query = rope(query, q_freqs)
        out = F.scaled_dot_product_attention(
            query, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj_dropout(self._project_out(merge_heads(out), token_specs)), new_cache

    def forward(
        self,
        q: Tensor,
        kv: Tensor | None = None,
        attn_mask: Tensor | None = None,
        q_freqs: Tensor | None = None,
        k_freqs: Tensor | None = None,
        kv_cache: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return self._attend(q, None, kv, attn_mask, q_freqs, k_freqs, kv_cache)
