"""``PerceiverBlock`` with the peer's layout and conditioning
(``noether.modeling.modules.blocks.perceiver``): ``norm1q``, ``norm1kv``,
``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``
and, with ``condition_dim``, ``modulation`` whose output is split as q scale,
q shift, kv scale, kv shift, attention gate, MLP scale, MLP shift, MLP gate
(adaLN-Zero: non-affine norms, zero-initialised, so a fresh block is the identity).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.blocks import PerceiverBlockConfig
from patternc.compat.noether.modeling.functional.modulation import modulate_gate, modulate_scale_shift
from patternc.compat.noether.modeling.modules.attention import PerceiverAttention
from patternc.compat.noether.modeling.modules.blocks._residual import ResidualBlock

__all__ = ["PerceiverBlock"]


class PerceiverBlock(ResidualBlock):
    """``forward(q, kv=None, condition=None, attn_kwargs=None)`` returns
    ``(q, kv_cache)``; ``attn_kwargs`` (``attn_mask``, ``q_freqs``, ``k_freqs``,
    ``kv_cache``) go to ``attn``; with a ``kv_cache``, ``kv`` may be None."""

    def __init__(self, config: PerceiverBlockConfig) -> None:
        super().__init__()
        self.config = config
        kv_dim = config.kv_dim or config.hidden_dim
        affine = self._build_modulation(
            config, "If modulation is enabled, modulation_linear_projection_config must be provided."
        )
        if self.modulation is not None:
            self._kv_dim = kv_dim
        self.norm1q = self._norm(config.hidden_dim, config, affine)
        self.norm1kv = self._norm(kv_dim, config, affine)
        self.attn: nn.Module = PerceiverAttention(config.perceiver_attention_config)
        self._build_mlp_branch(config, affine)

    def _run_mlp(self, x: Tensor, token_specs: Any) -> Tensor:
        out: Tensor = self.mlp(x) if token_specs is None else self.mlp(x, token_specs)
        return out

    def _forward(
        self, q: Tensor, kv: Tensor | None, condition: Tensor | None, kwargs: dict[str, Any], token_specs: Any
    ) -> tuple[Tensor, Any]:
        extra = {} if token_specs is None else {"token_specs": token_specs}
        if self.modulation is None:
            if condition is not None:
                raise ValueError("Conditioning vector provided, but modulation is not configured.")
            normed_kv = self.norm1kv(kv) if kv is not None else None
            attended, cache = self.attn(q=self.norm1q(q), kv=normed_kv, **extra, **kwargs)
            q = q + self.drop_path1(self.ls1(attended))
            return q + self.drop_path2(self.ls2(self._run_mlp(self.norm2(q), token_specs))), cache
        if condition is None:
            raise ValueError("No conditioning vector provided, but modulation is configured.")
        hd, kd = self.norm1q.normalized_shape[0], self._kv_dim
        mod = self.modulation(condition)
        q_scale, q_shift, kv_scale, kv_shift, attn_gate, mlp_scale, mlp_shift, mlp_gate = mod.split(
            [hd, hd, kd, kd, hd, hd, hd, hd], dim=-1
        )
        normed_kv = None
        if kwargs.get("kv_cache") is None:
            if kv is None:
                raise ValueError("kv must be provided when not using kv_cache")
            normed_kv = modulate_scale_shift(self.norm1kv(kv), kv_scale, kv_shift)
        attended, cache = self.attn(
            q=modulate_scale_shift(self.norm1q(q), q_scale, q_shift), kv=normed_kv, **extra, **kwargs
        )
        q = q + self.drop_path1(modulate_gate(self.ls1(attended), attn_gate))
        branch = self._run_mlp(modulate_scale_shift(self.norm2(q), mlp_scale, mlp_shift), token_specs)
        return q + self.drop_path2(modulate_gate(self.ls2(branch), mlp_gate)), cache

    def forward(
        self,
        q: Tensor,
        kv: Tensor | None = None,
        condition: Tensor | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Any]:
        return self._forward(q, kv, condition, dict(attn_kwargs or {}), None)
