"""The peer's blocks (``noether.modeling.modules.blocks``)."""

from patternc.compat.noether.modeling.modules.blocks.perceiver import PerceiverBlock
from patternc.compat.noether.modeling.modules.blocks.transformer import TransformerBlock

__all__ = ["PerceiverBlock", "TransformerBlock"]
