"""``TransformerBlock`` with the peer's layout and conditioning
(``noether.modeling.modules.blocks.transformer``).

Pre-norm residual block: ``norm1``, ``attention_block``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp`` (``fc1``/``fc2``), ``ls2``, ``drop_path2``.
With ``condition_dim`` it is an adaLN-Zero (DiT) block: ``modulation.project``
maps the condition to six vectors, read in the order *scale, shift, gate* of
the attention branch, then of the MLP branch; each branch computes
``x + gate * branch(norm(x) * (1 + scale) + shift)`` with non-affine norms,
and the projection starts at zero, so a fresh conditioned block is the identity.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.attention import AttentionConfig
from patternc.compat.noether.core.schemas.modules.blocks import TransformerBlockConfig
from patternc.compat.noether.modeling.functional.modulation import modulate_gate, modulate_scale_shift
from patternc.compat.noether.modeling.modules.attention import ATTENTION_REGISTRY
from patternc.compat.noether.modeling.modules.blocks._residual import ResidualBlock

__all__ = ["TransformerBlock", "check_condition"]


def check_condition(modulation: nn.Module | None, condition: Tensor | None, what: str) -> None:
    """The peer's errors for a condition given to an unconditioned block, or missing."""
    if modulation is None and condition is not None:
        raise ValueError(f"Conditioning vector provided, but the {what} is not configured for conditioning.")
    if modulation is not None and condition is None:
        raise ValueError(f"No conditioning vector provided, but the {what} is configured for conditioning.")


class TransformerBlock(ResidualBlock):
    """``forward(x, condition=None, attn_kwargs=None)`` returns ``(x, kv_cache)``;
    ``attn_kwargs`` go to ``attention_block`` as keywords (``token_specs``,
    ``freqs``, ``kv_cache``, ... for anchor attention; ``attn_mask``, ``freqs``
    for dot-product attention), and ``kv_cache`` is what it returned beside
    its output, or None."""

    def __init__(self, config: TransformerBlockConfig) -> None:
        super().__init__()
        self.config = config
        affine = self._build_modulation(
            config, "modulation_linear_projection_config must be provided if condition_dim is not None."
        )
        self.norm1 = self._norm(config.hidden_dim, config, affine)
        constructor: Any = config.attention_constructor
        if not callable(constructor):
            if constructor not in ATTENTION_REGISTRY:
                raise ValueError(
                    f"Unknown attention_constructor='{constructor}'. Available: {sorted(ATTENTION_REGISTRY)}"
                )
            constructor = ATTENTION_REGISTRY[constructor]
        self.attention_block: nn.Module = constructor(
            config=AttentionConfig(**config.model_dump(), **(config.attention_arguments or {}))
        )
        self._build_mlp_branch(config, affine)

    def _attention(self, h: Tensor, attn_kwargs: dict[str, Any] | None) -> tuple[Tensor, Any]:
        out = self.attention_block(h, **(attn_kwargs or {}))
        return out if isinstance(out, tuple) else (out, None)

    def forward(
        self, x: Tensor, condition: Tensor | None = None, attn_kwargs: dict[str, Any] | None = None
    ) -> tuple[Tensor, Any]:
        check_condition(self.modulation, condition, "transformer block")
        if self.modulation is None:
            attended, kv_cache = self._attention(self.norm1(x), attn_kwargs)
            x = x + self.drop_path1(self.ls1(attended))
            return x + self.drop_path2(self.ls2(self._mlp_forward(self.norm2(x), attn_kwargs))), kv_cache
        assert condition is not None
        if condition.shape[-1] != self.config.condition_dim:
            raise ValueError(
                f"Conditioning vector has incorrect shape. Expected {self.config.condition_dim}, "
                f"got {condition.shape[-1]}"
            )
        scale1, shift1, gate1, scale2, shift2, gate2 = self.modulation(condition).chunk(6, dim=-1)
        attended, kv_cache = self._attention(modulate_scale_shift(self.norm1(x), scale1, shift1), attn_kwargs)
        x = x + self.drop_path1(modulate_gate(self.ls1(attended), gate1))
        branch = self._mlp_forward(modulate_scale_shift(self.norm2(x), scale2, shift2), attn_kwargs)
        return x + self.drop_path2(modulate_gate(self.ls2(branch), gate2)), kv_cache

    def _mlp_forward(self, x: Tensor, attn_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The MLP branch (untied blocks pass ``attn_kwargs["token_specs"]`` on)."""
        out: Tensor = self.mlp(x)
        return out
