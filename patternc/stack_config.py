"""Configs of the transformer stack (torch-free): :class:`TransformerConfig`
and :class:`VisionTransformerConfig`, with the seed's string aliases.

The stack's options follow the seed's ``TransformerConfig``; what it adds is
that every layer's attention is a compiled pattern (see
:class:`patternc.nn.Transformer`). The seed's attention backends map onto
patternc's executors as :data:`ATTENTION_TYPES` says.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from patternc.schemas import Implementation
from patternc.strict import StrictConfig

__all__ = [
    "ATTENTION_TYPES",
    "AttentionType",
    "FfActivation",
    "NormKind",
    "Pool",
    "PosEmbType",
    "TransformerConfig",
    "VisionTransformerConfig",
]

PosEmbType = Literal["sinusoidal", "rope", "alibi", "none"]
"""Positions: ``sinusoidal`` (fixed, added to the embeddings), ``rope``
(rotary, on Q and K), ``alibi`` (a per-head additive bias ``-slope * |i - j|``),
``none``. Positions count within each token group, so packed documents each
start at 0."""

NormKind = Literal["layer", "rms"]
"""``layer`` (LayerNorm) or ``rms`` (RMSNorm)."""

FfActivation = Literal["gelu", "relu", "swiglu", "geglu"]
"""``gelu``/``relu``: two-layer MLP; ``swiglu``/``geglu``: ``act(gate(x)) * up(x)``, then down."""

Pool = Literal["cls", "mean"]
"""Vision transformer pooling: the ``[CLS]`` token, or the mean over patch tokens."""

AttentionType = Literal[
    "standard", "memory_efficient", "flash", "linear", "dense", "batched", "loop", "flex", "varlen", "auto"
]
"""The seed's backend names and patternc's own (see :data:`ATTENTION_TYPES`)."""

ATTENTION_TYPES: dict[str, Implementation] = {
    "standard": "batched",
    "memory_efficient": "batched",
    "flash": "flex",
    "linear": "linear",
    "dense": "dense",
    "batched": "batched",
    "loop": "loop",
    "flex": "flex",
    "varlen": "varlen",
    "auto": "auto",
}
"""Seed backend -> patternc executor. ``standard`` (the seed's default) and
``memory_efficient`` are ``batched``: the same function as a dense mask, one
fused SDPA call per group of same-shaped patterns, no ``[n, n]`` mask
(``dense``, one call with the dense mask, keeps that name); ``flash`` runs
FlexAttention (``flex``: one call of torch's block-sparse kernel), not the
FlashAttention library (``varlen`` launches FlashAttention's varlen kernel
where it is installed); ``linear`` is chunked linear attention."""


class TransformerConfig(StrictConfig):
    """Transformer stack hyperparameters (the seed's ``TransformerConfig``).

    ``pad_token_id`` (default 0, as in the seed): token ids equal to it are
    padding, masked out as keys (``key_padding_mask`` given to the forward
    replaces this); ``None`` treats every id as a real token, for a
    vocabulary whose id 0 is a word. ``max_len`` caps each group's length
    where positions are encoded (not with ``pos_emb_type="none"``).

    >>> TransformerConfig(vocab_size=100, d_model=64, num_heads=4, num_kv_heads=2).head_dim
    16
    >>> TransformerConfig(vocab_size=100, d_model=64, num_heads=5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for TransformerConfig
      Value error, d_model=64 is not divisible by num_heads=5; ...
    """

    _LOWERCASE: ClassVar[tuple[str, ...]] = ("ff_activation", "pos_emb_type", "norm_type", "attention_type")

    vocab_size: int | None = Field(
        gt=0,
        description="Required, as in the seed: the vocabulary size (ids in), or None ([B, N, d_model] in).",
    )
    d_model: int = Field(default=512, gt=0)
    num_heads: int = Field(default=8, gt=0)
    num_layers: int = Field(default=6, ge=0)
    d_ff: int = Field(default=2048, gt=0)
    dropout_rate: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_len: int = Field(
        default=512,
        gt=0,
        description="Longest group the positions cover (they count within groups); no limit with "
        'pos_emb_type="none", and rope_max_positions, when set, is the limit for "rope".',
    )
    use_pre_norm: bool = True
    pos_emb_type: PosEmbType = "sinusoidal"
    ff_activation: FfActivation = "gelu"
    norm_type: NormKind = "layer"
    pad_token_id: int | None = Field(
        default=0,
        description="Token id treated as padding: ids equal to it are masked out as keys (the seed's "
        "default, 0). None: no id is padding (a vocabulary whose id 0 is a real token).",
    )
    attention_type: AttentionType = "standard"
    attention_block_size: int = Field(
        default=512,
        gt=0,
        description="FlexAttention sparse block size (flash/flex): a multiple of 16 (the seed's 512; "
        "128 skips more of a fine-grained mask)",
    )
    linear_attention_chunk_size: int = Field(default=64, gt=0)
    rope_base: float = Field(default=10000.0, gt=0)
    rope_max_positions: int | None = Field(default=None, gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0, description="GQA/MQA; defaults to num_heads.")
    attention_window: int | None = Field(
        default=None, gt=0, description="Causal sliding window: every rule gets [causal, window N]."
    )
    kv_cache_max_len: int | None = Field(default=None, gt=0)
    causal: bool = Field(default=False, description="Every rule gets [causal] (a decoder).")
    untied: bool = Field(default=False, description="Per-token-type projections and MLPs.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rope_positions(self) -> int:
        return self.rope_max_positions or self.max_len

    @property
    def cache_len(self) -> int:
        return self.kv_cache_max_len or self.max_len

    @property
    def implementation(self) -> Implementation:
        return ATTENTION_TYPES[self.attention_type]

    @property
    def is_causal(self) -> bool:
        return self.causal or self.attention_window is not None

    @model_validator(mode="before")
    @classmethod
    def _vocab_size_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "vocab_size" not in data:
            raise ValueError(
                "vocab_size is required (as in the seed's TransformerConfig): the vocabulary size, "
                "or vocab_size=None for a stack over [B, N, d_model] features"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> TransformerConfig:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides d_model"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}; "
                "each K/V head serves a whole group of query heads"
            )
        if self.pos_emb_type == "rope" and self.head_dim % 2:
            raise ValueError(f"pos_emb_type='rope' needs an even head_dim, got {self.head_dim}")
        if self.pos_emb_type == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"pos_emb_type='sinusoidal' needs an even d_model, got {self.d_model}")
        if self.attention_block_size % 16:
            raise ValueError(
                f"attention_block_size must be a multiple of 16, got {self.attention_block_size}"
            )
        if self.vocab_size is not None and self.pad_token_id is not None:
            if not 0 <= self.pad_token_id < self.vocab_size:
                raise ValueError(
                    f"pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size}); "
                    "pass an id in it, or pad_token_id=None when no id is padding"
                )
        return self


class VisionTransformerConfig(StrictConfig):
    """A small ViT: square images cut into patches, a ``[CLS]`` token, the stack, a head."""

    transformer: TransformerConfig
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    in_channels: int = Field(default=3, gt=0)
    num_classes: int = Field(gt=0)
    pool: Pool = "cls"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @model_validator(mode="after")
    def _check(self) -> VisionTransformerConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.transformer.vocab_size is not None:
            raise ValueError("a vision transformer embeds patches: set transformer.vocab_size=None")
        if self.transformer.pos_emb_type != "none" and self.num_patches + 1 > self.transformer.max_len:
            raise ValueError(
                f"{self.num_patches} patches + [CLS] exceed transformer.max_len={self.transformer.max_len}"
            )
        return self
