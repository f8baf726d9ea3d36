"""Seed schemas: TokenSpec, AttentionPattern, AttentionConfig."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from patternc import AttentionConfig, AttentionPattern, TokenSpec


def test_token_spec_positional_and_keywords() -> None:
    assert TokenSpec("surface_anchors", 100) == TokenSpec(name="surface_anchors", size=100)
    assert TokenSpec("cached").size is None
    with pytest.raises(
        TypeError, match=r"TokenSpec takes at most 2 positional arguments \(name, size\), got 3"
    ):
        TokenSpec("a", 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="TokenSpec got two values for `name`"):
        TokenSpec("a", name="b")  # type: ignore[call-arg]


def test_token_spec_dict_round_trip() -> None:
    spec = TokenSpec.from_dict({"volume_queries": 7})
    assert spec == TokenSpec("volume_queries", 7)
    assert spec.to_dict() == {"volume_queries": 7}
    assert TokenSpec.from_dict({"x": None}).size is None
    with pytest.raises(ValueError, match=r"expects one \{name: size\} pair, got 2"):
        TokenSpec.from_dict({"a": 1, "b": 2})


def test_token_spec_domain_and_attn_type() -> None:
    assert (TokenSpec("surface_anchors").domain, TokenSpec("surface_anchors").attn_type) == (
        "surface",
        "anchors",
    )
    assert TokenSpec("surface_pressure_queries").domain == "surface_pressure"
    assert (TokenSpec("text").domain, TokenSpec("text").attn_type) == ("text", "")


def test_token_spec_validation() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        TokenSpec("a", -1)
    with pytest.raises(ValidationError, match="at least 1 character"):
        TokenSpec("", 3)
    assert hash(TokenSpec("a", 1)) == hash(TokenSpec("a", 1))  # frozen: usable as cache keys


def test_attention_pattern() -> None:
    pattern = AttentionPattern(query_tokens=["a", "b"], key_value_tokens=["a"])
    assert pattern == AttentionPattern(["a", "b"], ["a"])
    assert pattern.query_tokens == ("a", "b")
    with pytest.raises(
        ValidationError, match=r"expected a list of group names, got the string 'a'; write \['a'\]"
    ):
        AttentionPattern(query_tokens="a", key_value_tokens=["a"])  # type: ignore[arg-type]


def test_attention_config_defaults_and_extra_fields() -> None:
    config = AttentionConfig(hidden_dim=192, num_heads=3, my_backend_option=5)  # type: ignore[call-arg]
    assert (config.use_rope, config.dropout, config.bias, config.qk_norm, config.head_dim) == (
        False,
        0.0,
        True,
        False,
        None,
    )
    assert config.inner_dim == 192
    assert config.model_extra == {"my_backend_option": 5}
    with pytest.raises(
        ValidationError,
        match=r"hidden_dim \(100\) must be divisible by num_heads \(3\); use hidden_dim=99 or 102",
    ):
        AttentionConfig(hidden_dim=100, num_heads=3)
    with pytest.raises(ValidationError, match="init_weights"):
        AttentionConfig(hidden_dim=8, num_heads=2, init_weights="normal")  # type: ignore[arg-type]
