"""What the peer's transformer and perceiver blocks share: the optional
adaLN-Zero ``modulation`` and the modules of the MLP branch."""

from __future__ import annotations

from torch import nn

from patternc.compat.noether.core.schemas.modules.blocks import TransformerBlockConfig
from patternc.compat.noether.modeling.modules.layers import LayerScale, LinearProjection, UnquantizedDropPath
from patternc.compat.noether.modeling.modules.mlp import UpActDownMlp

__all__ = ["ResidualBlock"]


class ResidualBlock(nn.Module):
    """A pre-norm block's construction steps; subclasses call them in the
    peer's order (``modulation`` first, the attention's norms and module,
    then the MLP branch), which is the order of the state dict's keys."""

    def _build_modulation(self, config: TransformerBlockConfig, missing: str) -> bool:
        """Sets ``modulation``: the condition's projection, or None without
        ``condition_dim``. Returns whether the norms are affine (only without
        a modulation, whose shifts stand in for the norms' biases).

        Raises:
            ValueError: a conditioned block without biases, or a config with
                no modulation projection (the message ``missing``).
        """
        self.modulation: LinearProjection | None = None
        if config.condition_dim is None:
            return True
        if not config.bias:
            raise ValueError(
                "a conditioned block needs bias=True (its norms' shift comes from the modulation)"
            )
        projection = config.modulation_linear_projection_config
        if projection is None:
            raise ValueError(missing)
        self.modulation = LinearProjection(projection)
        return False

    @staticmethod
    def _norm(dim: int, config: TransformerBlockConfig, affine: bool) -> nn.LayerNorm:
        return nn.LayerNorm(dim, elementwise_affine=affine, bias=config.bias, eps=config.eps)

    def _build_mlp_branch(self, config: TransformerBlockConfig, affine: bool) -> None:
        """``ls1`` and ``drop_path1`` (after the attention), then ``norm2``,
        ``mlp``, ``ls2`` and ``drop_path2``."""
        self.ls1 = LayerScale(config.layerscale_config)
        self.drop_path1 = UnquantizedDropPath(config.drop_path_config)
        self.norm2 = self._norm(config.hidden_dim, config, affine)
        self.mlp: nn.Module = UpActDownMlp(config.up_act_down_mlp_config)
        self.ls2 = LayerScale(config.layerscale_config)
        self.drop_path2 = UnquantizedDropPath(config.drop_path_config)
