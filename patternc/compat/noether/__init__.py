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

from patternc.compat.noether.core.schemas import modules as _configs
from patternc.compat.noether.core.schemas.modules import *  # noqa: F403
from patternc.compat.noether.modeling import modules as _modules
from patternc.compat.noether.modeling.modules import *  # noqa: F403
from patternc.compat.noether.modeling.modules.attention import anchor_attention as _anchor_attention
from patternc.compat.noether.modeling.modules.attention.anchor_attention import *  # noqa: F403
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

# the untied modules (not ``peer_takes_bmm``, the peer's path rule, which stays
# in its module), then every name of the configs, the modules and anchor attention, in the
# forms type checkers read as re-exports (``__all__ += module.__all__``)
__all__ = [
    "SquareBankWarning",
    "SquareBanks",
    "UntiedLinear",
    "UntiedMLP",
    "UntiedMixedAttention",
    "UntiedPerceiverAttention",
    "UntiedPerceiverBlock",
    "UntiedTransformerBlock",
    "set_square_banks",
]
__all__ += _configs.__all__
__all__ += _modules.__all__
__all__ += _anchor_attention.__all__
