"""Anchor attention: the patterns each class builds, and its outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patternc import AttentionPattern as P
from patternc import TokenSpec
from patternc.configs import CrossAnchorAttentionConfig, JointAnchorAttentionConfig, SelfAnchorAttentionConfig
from patternc.nn import CrossAnchorAttention, JointAnchorAttention, MixedAttention, SelfAnchorAttention

SPECS = [
    TokenSpec("surface_anchors", 4),
    TokenSpec("surface_queries", 3),
    TokenSpec("volume_anchors", 5),
    TokenSpec("volume_queries", 2),
]
COMMON = {"hidden_dim": 16, "num_heads": 2, "branches": ["surface", "volume"]}


def patterns_of(
    module: SelfAnchorAttention | CrossAnchorAttention | JointAnchorAttention, specs: list[TokenSpec]
) -> list[P]:
    return module.plan(specs).attention_patterns


def test_self_anchor_patterns_are_the_seeds() -> None:
    module = SelfAnchorAttention(SelfAnchorAttentionConfig(**COMMON))
    assert patterns_of(module, SPECS) == [
        P(query_tokens=["surface_anchors", "surface_queries"], key_value_tokens=["surface_anchors"]),
        P(query_tokens=["volume_anchors", "volume_queries"], key_value_tokens=["volume_anchors"]),
    ]


def test_cross_anchor_patterns_are_the_seeds() -> None:
    module = CrossAnchorAttention(CrossAnchorAttentionConfig(**COMMON))
    assert patterns_of(module, SPECS) == [
        P(query_tokens=["surface_anchors", "surface_queries"], key_value_tokens=["volume_anchors"]),
        P(query_tokens=["volume_anchors", "volume_queries"], key_value_tokens=["surface_anchors"]),
    ]


def test_cross_anchor_three_branches() -> None:
    module = CrossAnchorAttention(
        CrossAnchorAttentionConfig(hidden_dim=16, num_heads=2, branches=["a", "b", "c"])
    )
    specs = [TokenSpec(n, 2) for n in ["a_anchors", "a_queries", "b_anchors", "c_anchors", "c_queries"]]
    assert patterns_of(module, specs) == [
        P(["a_anchors", "a_queries"], ["b_anchors", "c_anchors"]),
        P(["b_anchors"], ["a_anchors", "c_anchors"]),
        P(["c_anchors", "c_queries"], ["a_anchors", "b_anchors"]),
    ]


def test_joint_patterns_are_the_seeds() -> None:
    module = JointAnchorAttention(JointAnchorAttentionConfig(**COMMON))
    assert patterns_of(module, SPECS) == [
        P(
            query_tokens=["surface_anchors", "surface_queries", "volume_anchors", "volume_queries"],
            key_value_tokens=["surface_anchors", "volume_anchors"],
        )
    ]
    only_volume = [TokenSpec("surface_queries", 3), TokenSpec("volume_anchors", 5)]
    assert patterns_of(module, only_volume) == [P(["surface_queries", "volume_anchors"], ["volume_anchors"])]


@pytest.mark.parametrize(
    ("cls", "config_cls"),
    [
        (SelfAnchorAttention, SelfAnchorAttentionConfig),
        (CrossAnchorAttention, CrossAnchorAttentionConfig),
        (JointAnchorAttention, JointAnchorAttentionConfig),
    ],
)
def test_outputs_equal_mixed_attention_with_hand_written_patterns(cls: type, config_cls: type) -> None:
    torch.manual_seed(0)
    module = cls(config_cls(**COMMON))
    mixed = MixedAttention(module.mixed_attention.config)
    mixed.load_state_dict(module.mixed_attention.state_dict())
    hand_written = {
        SelfAnchorAttention: [
            P(["surface_anchors", "surface_queries"], ["surface_anchors"]),
            P(["volume_anchors", "volume_queries"], ["volume_anchors"]),
        ],
        CrossAnchorAttention: [
            P(["surface_anchors", "surface_queries"], ["volume_anchors"]),
            P(["volume_anchors", "volume_queries"], ["surface_anchors"]),
        ],
        JointAnchorAttention: [
            P(
                ["surface_anchors", "surface_queries", "volume_anchors", "volume_queries"],
                ["surface_anchors", "volume_anchors"],
            )
        ],
    }[cls]
    x = torch.randn(2, 14, 16)
    out = module(x, SPECS)
    expected, _ = mixed(x, SPECS, hand_written)
    assert torch.equal(out, expected)
    # shared parameters across branches: one attention module, one QKV weight
    assert sum(1 for n, _ in module.named_parameters() if n.endswith("qkv.weight")) == 1


def test_missing_branch_or_anchor_is_a_clear_error() -> None:
    self_anchor = SelfAnchorAttention(SelfAnchorAttentionConfig(**COMMON))
    with pytest.raises(
        ValueError,
        match=r"needs every configured branch \['surface', 'volume'\] and its anchors.*missing branches: none, missing anchor groups: \['volume_anchors'\]",
    ):
        self_anchor(
            torch.randn(1, 9, 16),
            [
                TokenSpec("surface_anchors", 4),
                TokenSpec("surface_queries", 3),
                TokenSpec("volume_queries", 2),
            ],
        )
    cross = CrossAnchorAttention(CrossAnchorAttentionConfig(**COMMON))
    with pytest.raises(ValueError, match=r"missing branches: \['volume'\]"):
        cross(torch.randn(1, 7, 16), SPECS[:2])
    joint = JointAnchorAttention(JointAnchorAttentionConfig(**COMMON))
    with pytest.raises(ValueError, match="needs at least one anchor group"):
        joint(torch.randn(1, 5, 16), [TokenSpec("surface_queries", 3), TokenSpec("volume_queries", 2)])
    with pytest.raises(ValueError, match="at least two branches"):
        CrossAnchorAttentionConfig(hidden_dim=16, num_heads=2, branches=["surface"])
    with pytest.raises(ValueError, match="branches must be unique"):
        SelfAnchorAttentionConfig(hidden_dim=16, num_heads=2, branches=["a", "a"])


def test_group_outside_the_branches_is_reported_by_the_checker() -> None:
    module = SelfAnchorAttention(SelfAnchorAttentionConfig(**COMMON))
    with pytest.raises(
        ValueError, match="group `wake_queries` is a query in no rule of pattern `self_anchor`"
    ):
        module(torch.randn(1, 16, 16), [*SPECS, TokenSpec("wake_queries", 2)])


def test_anchor_suffix_and_cached_anchors() -> None:
    config = SelfAnchorAttentionConfig(hidden_dim=16, num_heads=2, branches=["s"], anchor_suffix="_ref")
    module = SelfAnchorAttention(config)
    assert patterns_of(module, [TokenSpec("s_ref", 3), TokenSpec("s_q", 4)]) == [
        P(["s_ref", "s_q"], ["s_ref"])
    ]


def test_pattern_source_compiles_with_the_cli(tmp_path: Path) -> None:
    module = JointAnchorAttention(JointAnchorAttentionConfig(**COMMON))
    path = tmp_path / "joint.pc"
    path.write_text(module.pattern_source(SPECS))
    result = subprocess.run(
        [sys.executable, "-m", "patternc", "compile", str(path), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (
        '"key_value_tokens": [\n            "surface_anchors",\n            "volume_anchors"\n          ]'
        in result.stdout
    )


def test_base_class_says_which_classes_to_use() -> None:
    from patternc.configs import AnchorAttentionConfig
    from patternc.nn import MultiBranchAnchorAttention

    base = MultiBranchAnchorAttention(AnchorAttentionConfig(**COMMON))
    with pytest.raises(
        TypeError, match="use SelfAnchorAttention, CrossAnchorAttention or JointAnchorAttention"
    ):
        base(torch.randn(1, 14, 16), SPECS)


def test_anchor_modules_take_a_padding_mask_and_return_and_read_a_kv_cache() -> None:
    """`attend` returns (out, new cache) like MixedAttention; a later call with the
    anchors' size None reads that cache and gives the queries the same outputs."""
    torch.manual_seed(0)
    attn = SelfAnchorAttention(
        SelfAnchorAttentionConfig(hidden_dim=16, num_heads=2, branches=["surface", "volume"])
    )
    sizes = {"surface_anchors": 3, "surface_queries": 4, "volume_anchors": 5, "volume_queries": 2}
    specs = [TokenSpec(n, s) for n, s in sizes.items()]
    x = torch.randn(2, 14, 16)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 0] = False
    plain = MixedAttention(attn.mixed_attention.config)
    plain.load_state_dict(attn.mixed_attention.state_dict())
    patterns = [
        P(["surface_anchors", "surface_queries"], ["surface_anchors"]),
        P(["volume_anchors", "volume_queries"], ["volume_anchors"]),
    ]
    expected, _ = plain(x, specs, patterns, key_padding_mask=mask)
    assert torch.allclose(attn(x, specs, key_padding_mask=mask), expected, atol=1e-6)
    out, cache = attn.attend(x, specs)
    assert cache is not None and sorted(cache) == ["surface_anchors", "volume_anchors"]
    cached_specs = [TokenSpec(n, None if n.endswith("anchors") else s) for n, s in sizes.items()]
    queries = torch.cat([x[:, 3:7], x[:, 12:]], dim=1)
    again = attn(queries, cached_specs, kv_cache=cache)
    assert torch.allclose(again, torch.cat([out[:, 3:7], out[:, 12:]], dim=1), atol=1e-6)
