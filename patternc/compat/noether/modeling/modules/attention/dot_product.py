"""``DotProductAttention`` with the peer's layout: projections ``q``, ``k``,
``v`` and ``proj`` (``noether.modeling.modules.attention.dot_product``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.attention import AttentionConfig, DotProductAttentionConfig
from patternc.compat.noether.modeling.functional.init import apply_init_method
from patternc.compat.noether.modeling.functional.rope import rope

__all__ = ["DotProductAttention", "merge_heads", "split_heads"]


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``[B, N, H * D]`` -> ``[B, H, N, D]``."""
    batch, n, width = t.shape
    return t.view(batch, n, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H * D]``."""
    batch, heads, n, dim = t.shape
    return t.transpose(1, 2).reshape(batch, n, heads * dim)


def fused(x: Tensor, layers: tuple[nn.Linear, ...]) -> Tensor:
    """``x`` through several linears in one matmul (their weights stacked by rows)."""
    weight = torch.cat([layer.weight for layer in layers], dim=0)
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers], dim=0)
    return F.linear(x, weight, bias)


class DotProductAttention(nn.Module):
    """Full multi-head attention over ``x``: ``forward(x, attn_mask=None, freqs=None)``,
    ``attn_mask`` as in ``scaled_dot_product_attention``, ``freqs`` complex
    ``[B, N, head_dim // 2]`` when ``use_rope``."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        config = DotProductAttentionConfig(**config.model_dump())
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_dim // config.num_heads
        self.init_weights = config.init_weights
        self.use_rope = config.use_rope
        self.dropout = config.dropout
        self.proj_dropout = nn.Dropout(config.dropout)
        self.q = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.k = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.v = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        self.proj = nn.Linear(config.hidden_dim, config.hidden_dim, bias=config.bias)
        apply_init_method(self, self.proj.weight, self.init_weights)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, freqs: Tensor | None = None) -> Tensor:
        q, k, v = (
            split_heads(t, self.num_heads) for t in fused(x, (self.q, self.k, self.v)).chunk(3, dim=-1)
        )
        if self.use_rope:
            if freqs is None:
                raise ValueError("use_rope=True needs freqs (complex [batch, tokens, head_dim // 2])")
            q, k = rope(q, freqs), rope(k, freqs)
        elif freqs is not None:
            raise ValueError("freqs were given but this attention has use_rope=False")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out_: Tensor = self.proj_dropout(self.proj(merge_heads(out)))
        return out_
