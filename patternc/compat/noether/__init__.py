"""The peer package ``noether`` (emmiai-noether 2026.4.0), its attention
modules and configs, on patternc's attention core.

Porting is a change of import lines: ``noether.X.Y`` becomes
``patternc.compat.noether.X.Y`` for the modules and configs listed here (the
same names, constructor signatures, attributes, parameter layout and state
dict keys, call forms and return types), so a peer checkpoint loads with
``load_state_dict(state, strict=True)`` and gives the peer's outputs and
gradients. Every name is also importable from this package directly.

One choice the peer leaves implicit is explicit here: what square untied
banks compute (:func:`set_square_banks`; see
:mod:`patternc.compat.noether.modeling.modules.untied`).

The modules are patternc modules underneath: ``MixedAttention`` is a
:class:`patternc.nn.MixedAttention` (patterns checked by patternc's checks,
run by its executors, a compiled :class:`patternc.Plan` accepted in place of
a pattern list), and ``UntiedLinear`` is a :class:`patternc.nn.UntiedLinear`.
"""

from patternc.compat.noether.core.schemas.modules import (
    AttentionConfig,
    AttentionPattern,
    CrossAnchorAttentionConfig,
    DotProductAttentionConfig,
    JointAnchorAttentionConfig,
    LayerScaleConfig,
    LinearProjectionConfig,
    MixedAttentionConfig,
    MLPConfig,
    MultiBranchAnchorAttentionConfig,
    PerceiverAttentionConfig,
    PerceiverBlockConfig,
    RopeFrequencyConfig,
    TokenSpec,
    TransformerBlockConfig,
    UnquantizedDropPathConfig,
    UntiedLinearConfig,
    UntiedMixedAttentionConfig,
    UntiedMLPConfig,
    UntiedPerceiverBlockConfig,
    UntiedTransformerBlockConfig,
    UpActDownMLPConfig,
)
from patternc.compat.noether.modeling.modules import (
    MLP,
    Activation,
    DotProductAttention,
    LayerScale,
    LinearProjection,
    PerceiverAttention,
    PerceiverBlock,
    RopeFrequency,
    TransformerBlock,
    UnquantizedDropPath,
    UpActDownMlp,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention import (
    CrossAnchorAttention,
    JointAnchorAttention,
    MixedAttention,
    MultiBranchAnchorAttention,
    SelfAnchorAttention,
)
from patternc.compat.noether.modeling.modules.untied import (
    SquareBanks,
    SquareBankWarning,
    UntiedLinear,
    UntiedMixedAttention,
    UntiedMLP,
    UntiedPerceiverAttention,
    UntiedPerceiverBlock,
    UntiedTransformerBlock,
    set_square_banks,
)

__all__ = [
    "MLP",
    "Activation",
    "AttentionConfig",
    "AttentionPattern",
    "CrossAnchorAttention",
    "CrossAnchorAttentionConfig",
    "DotProductAttention",
    "DotProductAttentionConfig",
    "JointAnchorAttention",
    "JointAnchorAttentionConfig",
    "LayerScale",
    "LayerScaleConfig",
    "LinearProjection",
    "LinearProjectionConfig",
    "MLPConfig",
    "MixedAttention",
    "MixedAttentionConfig",
    "MultiBranchAnchorAttention",
    "MultiBranchAnchorAttentionConfig",
    "PerceiverAttention",
    "PerceiverAttentionConfig",
    "PerceiverBlock",
    "PerceiverBlockConfig",
    "RopeFrequency",
    "RopeFrequencyConfig",
    "SelfAnchorAttention",
    "SquareBankWarning",
    "SquareBanks",
    "TokenSpec",
    "TransformerBlock",
    "TransformerBlockConfig",
    "UnquantizedDropPath",
    "UnquantizedDropPathConfig",
    "UntiedLinear",
    "UntiedLinearConfig",
    "UntiedMLP",
    "UntiedMLPConfig",
    "UntiedMixedAttention",
    "UntiedMixedAttentionConfig",
    "UntiedPerceiverAttention",
    "UntiedPerceiverBlock",
    "UntiedPerceiverBlockConfig",
    "UntiedTransformerBlock",
    "UntiedTransformerBlockConfig",
    "UpActDownMLPConfig",
    "UpActDownMlp",
    "set_square_banks",
]
