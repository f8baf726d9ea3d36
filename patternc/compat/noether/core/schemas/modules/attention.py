"""The peer's attention configs, ``TokenSpec`` and ``AttentionPattern``
(``noether.core.schemas.modules.attention``).

Field names, defaults and validation follow the peer. ``TokenSpec`` is
patternc's own with the peer's ``domain`` rule (the name's *first*
``_``-separated word: ``surface`` for ``surface_anchors_fine``), which is the
rule the peer's untied layers bind weight banks by. ``AttentionPattern`` is
patternc's (the same two fields).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from patternc.compat.noether.core.types import InitWeightsMode
from patternc.schemas import AttentionPattern
from patternc.schemas import TokenSpec as _CoreTokenSpec

__all__ = [
    "AttentionConfig",
    "AttentionPattern",
    "CrossAnchorAttentionConfig",
    "DotProductAttentionConfig",
    "JointAnchorAttentionConfig",
    "MixedAttentionConfig",
    "MultiBranchAnchorAttentionConfig",
    "PerceiverAttentionConfig",
    "TokenSpec",
]


class AttentionConfig(BaseModel):
    """An attention module's options; extra fields are kept (one schema serves
    every attention implementation, as in the peer)."""

    model_config = ConfigDict(extra="allow")

    hidden_dim: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1)
    use_rope: bool = False
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    init_weights: InitWeightsMode = "truncnormal002"
    bias: bool = True
    head_dim: int | None = None

    @model_validator(mode="after")
    def validate_hidden_dim_and_num_heads(self) -> AttentionConfig:
        """``head_dim`` is always ``hidden_dim // num_heads`` (set here, as the peer does)."""
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError("The 'hidden_dim' must be divisible by 'num_heads'.")
        self.head_dim = self.hidden_dim // self.num_heads
        return self


class DotProductAttentionConfig(AttentionConfig):
    """Options of ``DotProductAttention``."""


class MixedAttentionConfig(DotProductAttentionConfig):
    """Options of ``MixedAttention``."""


class PerceiverAttentionConfig(AttentionConfig):
    """Options of ``PerceiverAttention``; ``kv_dim`` defaults to ``hidden_dim``."""

    kv_dim: int | None = None

    @model_validator(mode="after")
    def set_kv_dim(self) -> PerceiverAttentionConfig:
        if self.kv_dim is None:
            self.kv_dim = self.hidden_dim
        return self


class MultiBranchAnchorAttentionConfig(AttentionConfig):
    """Anchor attention over ``branches``; a branch's anchors are the group
    ``branch + anchor_suffix``."""

    branches: list[str] = Field(..., min_length=1)
    anchor_suffix: str = "_anchors"


class CrossAnchorAttentionConfig(MultiBranchAnchorAttentionConfig):
    """Options of ``CrossAnchorAttention``."""


class JointAnchorAttentionConfig(MultiBranchAnchorAttentionConfig):
    """Options of ``JointAnchorAttention``."""


class TokenSpec(_CoreTokenSpec):
    """A token group: ``name`` and ``size`` (``None``: its keys and values come
    from a KV cache). ``domain`` is the first ``_``-separated word of the name
    and ``attn_type`` the last, both in ``model_dump()`` as in the peer.

    >>> TokenSpec(name="surface_anchors", size=4).domain
    'surface'
    """

    size: int | None = Field(..., ge=0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def domain(self) -> str:
        """``surface`` for ``surface_anchors`` (the first word)."""
        return self.name.split("_")[0]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def attn_type(self) -> str:
        """``anchors`` for ``surface_anchors`` (the last word)."""
        return self.name.split("_")[-1]
