"""The peer's attention modules (``noether.modeling.modules.attention``)."""

from torch import nn

from patternc.compat.noether.modeling.modules.attention.dot_product import DotProductAttention
from patternc.compat.noether.modeling.modules.attention.perceiver import PerceiverAttention

ATTENTION_REGISTRY: dict[str, type[nn.Module]] = {
    "dot_product": DotProductAttention,
    "perceiver": PerceiverAttention,
}
"""``TransformerBlockConfig.attention_constructor`` names -> classes (the peer's
Transolver attentions are not part of this package)."""

__all__ = ["ATTENTION_REGISTRY", "DotProductAttention", "PerceiverAttention"]
