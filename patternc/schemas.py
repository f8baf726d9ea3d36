"""Pydantic schemas shared by the compiler and the torch runtime.

``TokenSpec``, ``AttentionPattern`` and ``AttentionConfig`` follow the seed
API (``shared/seeds/001``). They never import torch, so the compiler and the
command line stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AttentionConfig",
    "AttentionPattern",
    "Implementation",
    "InitWeightsMode",
    "MixedAttentionConfig",
    "TokenSpec",
    "TokenSpecs",
    "as_token_specs",
]

InitWeightsMode = Literal["torch", "truncnormal002", "xavier_uniform", "zero", "zeros"]
"""Weight initialisation of attention projections.

- ``"torch"``: PyTorch's defaults for ``nn.Linear``.
- ``"truncnormal002"``: truncated normal, std 0.02, biases zero.
- ``"xavier_uniform"``: Xavier-uniform weights, biases zero.
- ``"zero"``: like ``"truncnormal002"`` but the output projection of attention
  and the last layer of an MLP start at zero, so each residual branch starts
  closed and a block starts as the identity (the peer's ``"truncnormal002-identity"``).
- ``"zeros"``: every weight and bias starts at zero.

The peer's spellings are read with their meaning: ``"truncnormal"`` as
``"truncnormal002"``, ``"truncnormal002-identity"`` as ``"zero"``, in any case.
"""

PEER_INIT_MODES = {"truncnormal": "truncnormal002", "truncnormal002-identity": "zero"}


def _peer_init_mode(value: object) -> object:
    if isinstance(value, str):
        lowered = value.lower()
        return PEER_INIT_MODES.get(lowered, lowered)
    return value


InitWeights = Annotated[InitWeightsMode, BeforeValidator(_peer_init_mode)]
"""The config field type: :data:`InitWeightsMode`, with the peer's spellings."""


def domain_of(name: str) -> str:
    """``surface`` for ``surface_anchors``: the name up to its last ``_``."""
    return name.rsplit("_", 1)[0] if "_" in name else name


class _PositionalModel(BaseModel):
    """Lets ``Model(a, b)`` fill the fields named in ``_positional`` in order,
    as the seed's examples write ``TokenSpec("surface_anchors", 100)``."""

    _positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, /, *args: Any, **data: Any) -> None:
        if len(args) > len(self._positional):
            raise TypeError(
                f"{type(self).__name__} takes at most {len(self._positional)} positional "
                f"arguments ({', '.join(self._positional)}), got {len(args)}"
            )
        for key, value in zip(self._positional, args):
            if key in data:
                raise TypeError(f"{type(self).__name__} got two values for `{key}`")
            data[key] = value
        super().__init__(**data)


class TokenSpec(_PositionalModel):
    """A token group in the input: its name and how many tokens it holds.

    ``size=None`` means the group is not in the input tensor; its keys and
    values come from a KV cache instead.

    >>> TokenSpec("surface_anchors", 100).domain
    'surface'
    """

    model_config = ConfigDict(frozen=True)
    _positional: ClassVar[tuple[str, ...]] = ("name", "size")

    name: str = Field(min_length=1)
    size: int | None = Field(default=None, ge=0)

    @classmethod
    def from_dict(cls, token_dict: dict[str, int | None]) -> TokenSpec:
        """``{"surface_anchors": 100}`` -> ``TokenSpec("surface_anchors", 100)``."""
        if len(token_dict) != 1:
            raise ValueError(
                f"TokenSpec.from_dict expects one {{name: size}} pair, got {len(token_dict)}: {token_dict!r}"
            )
        ((name, size),) = token_dict.items()
        return cls(name=name, size=size)

    def to_dict(self) -> dict[str, int | None]:
        return {self.name: self.size}

    @property
    def domain(self) -> str:
        """The part before the last ``_`` (``surface`` for ``surface_anchors``);
        the whole name when it has no ``_``."""
        return domain_of(self.name)

    @property
    def attn_type(self) -> str:
        """The part after the last ``_`` (``anchors`` for ``surface_anchors``);
        empty when the name has no ``_``."""
        return self.name.rsplit("_", 1)[1] if "_" in self.name else ""


TokenSpecs = Union[Sequence[Union[TokenSpec, Mapping[str, Union[int, None]]]], Mapping[str, Union[int, None]]]
"""Groups in input order: ``TokenSpec`` list, ``{name: size}`` dicts, or one ``{name: size, ...}`` dict."""


def as_token_specs(token_specs: TokenSpecs) -> list[TokenSpec]:
    """Normalise the accepted ways of listing groups to a ``TokenSpec`` list."""
    if isinstance(token_specs, Mapping):
        return [TokenSpec(name=name, size=size) for name, size in token_specs.items()]
    specs = []
    for spec in token_specs:
        if isinstance(spec, TokenSpec):
            specs.append(spec)
        elif isinstance(spec, Mapping):
            specs.append(TokenSpec.from_dict(dict(spec)))
        else:
            raise TypeError(
                f"token_specs holds {type(spec).__name__}; expected TokenSpec or a {{name: size}} dict"
            )
    return specs


class AttentionPattern(_PositionalModel):
    """The tokens of ``query_tokens`` attend to those of ``key_value_tokens``."""

    model_config = ConfigDict(frozen=True)
    _positional: ClassVar[tuple[str, ...]] = ("query_tokens", "key_value_tokens")

    query_tokens: tuple[str, ...]
    key_value_tokens: tuple[str, ...]

    @field_validator("query_tokens", "key_value_tokens", mode="before")
    @classmethod
    def _no_bare_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"expected a list of group names, got the string {value!r}; write [{value!r}]")
        return value


class AttentionConfig(BaseModel):
    """Configuration of an attention module. Extra fields are allowed so one
    schema serves every attention implementation."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _no_typos(cls, data: Any) -> Any:
        """Extra fields are the seed's contract (other backends read them),
        but one a letter or two from a known field is a typo, refused."""
        from patternc.strict import check_fields

        return check_fields(cls, data, {}, (), allow_unrelated=True)

    hidden_dim: int = Field(gt=0, description="Dimensionality of the hidden features.")
    num_heads: int = Field(gt=0, description="Number of attention heads.")
    use_rope: bool = Field(default=False, description="Apply rotary position embeddings.")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on attention weights and output."
    )
    init_weights: InitWeights = Field(default="truncnormal002", description="Initialisation.")
    bias: bool = Field(default=True, description="Bias terms in the linear layers.")
    head_dim: int | None = Field(
        default=None, gt=0, description="Per-head width; hidden_dim // num_heads when None."
    )
    qk_norm: bool = Field(default=False, description="LayerNorm on queries and keys per head.")

    @model_validator(mode="after")
    def validate_hidden_dim_and_num_heads(self) -> AttentionConfig:
        if self.head_dim is None and self.hidden_dim % self.num_heads != 0:
            lower = self.hidden_dim - self.hidden_dim % self.num_heads
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads}); "
                f"use hidden_dim={lower} or {lower + self.num_heads}, a num_heads that divides "
                f"{self.hidden_dim}, or set head_dim explicitly"
            )
        return self

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads (``num_heads * head_dim``)."""
        return self.num_heads * (self.head_dim or self.hidden_dim // self.num_heads)


Implementation = Literal["batched", "loop", "dense", "flex", "varlen", "auto", "linear"]
"""Executors of ``MixedAttention``:

- ``"batched"``: one attention launch per set of equal-shaped calls, reading
  contiguous groups as views (the fast default);
- ``"loop"``: one attention call per pattern (the readable one);
- ``"dense"``: one call over all tokens with a dense boolean mask (the reference);
- ``"flex"``: one FlexAttention call with a block mask built from the layout;
- ``"varlen"``: every call a segment of one variable-length attention launch
  (CUDA, half precision; else it runs as ``batched``);
- ``"auto"``: picks one of these per layout from a cost model;
- ``"linear"``: chunked linear attention (``elu + 1`` features instead of
  softmax: a different function, for the patterns it can express).
"""


class MixedAttentionConfig(AttentionConfig):
    """``AttentionConfig`` plus the executor that runs the patterns."""

    implementation: Implementation = Field(
        default="batched",
        description="Executor: 'batched' (fast), 'loop' (readable), 'dense' (reference), "
        "'flex' (FlexAttention), 'linear' (linear attention, not softmax).",
    )
