"""The peer's module configs (``noether.core.schemas.modules``)."""

from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionConfig,
    AttentionPattern,
    CrossAnchorAttentionConfig,
    DotProductAttentionConfig,
    JointAnchorAttentionConfig,
    MixedAttentionConfig,
    MultiBranchAnchorAttentionConfig,
    PerceiverAttentionConfig,
    TokenSpec,
)
from patternc.compat.noether.core.schemas.modules.blocks import PerceiverBlockConfig, TransformerBlockConfig
from patternc.compat.noether.core.schemas.modules.layers import (
    LayerScaleConfig,
    LinearProjectionConfig,
    RopeFrequencyConfig,
    UnquantizedDropPathConfig,
)
from patternc.compat.noether.core.schemas.modules.mlp import MLPConfig, UpActDownMLPConfig
from patternc.compat.noether.core.schemas.modules.untied import (
    UntiedLinearConfig,
    UntiedMixedAttentionConfig,
    UntiedMLPConfig,
    UntiedPerceiverBlockConfig,
    UntiedTransformerBlockConfig,
)

__all__ = [
    "AttentionConfig",
    "AttentionPattern",
    "CrossAnchorAttentionConfig",
    "DotProductAttentionConfig",
    "JointAnchorAttentionConfig",
    "LayerScaleConfig",
    "LinearProjectionConfig",
    "MLPConfig",
    "MixedAttentionConfig",
    "MultiBranchAnchorAttentionConfig",
    "PerceiverAttentionConfig",
    "PerceiverBlockConfig",
    "RopeFrequencyConfig",
    "TokenSpec",
    "TransformerBlockConfig",
    "UnquantizedDropPathConfig",
    "UntiedLinearConfig",
    "UntiedMLPConfig",
    "UntiedMixedAttentionConfig",
    "UntiedPerceiverBlockConfig",
    "UntiedTransformerBlockConfig",
    "UpActDownMLPConfig",
]
