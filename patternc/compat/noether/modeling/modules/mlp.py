"""The peer's MLPs (``noether.modeling.modules.mlp``): ``MLP`` (an ``nn.Sequential``
in ``mlp``) and ``UpActDownMlp`` (``fc1``, ``act``, ``fc2``)."""

from __future__ import annotations

from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.mlp import MLPConfig, UpActDownMLPConfig
from patternc.compat.noether.modeling.functional.init import init_trunc_normal_zero_bias
from patternc.compat.noether.modeling.modules.activations import Activation
from patternc.compat.noether.refusals import PeerRefusal

__all__ = ["MLP", "UpActDownMlp"]


class MLP(nn.Module):
    """``input -> hidden -> [hidden] * num_layers -> output``, ``activation`` between."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.init_weights = config.init_weights
        layers: list[nn.Module] = [
            nn.Linear(config.input_dim, config.hidden_dim),
            Activation[config.activation].build(),
        ]
        for _ in range(config.num_layers):
            layers += [nn.Linear(config.hidden_dim, config.hidden_dim), Activation[config.activation].build()]
        layers.append(nn.Linear(config.hidden_dim, config.output_dim))
        self.mlp = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torch`` or ``truncnormal002``; other modes raise ``PeerRefusal``, a
        ``NotImplementedError`` (the peer's set)."""
        if self.init_weights == "torch":
            return
        if self.init_weights != "truncnormal002":
            raise PeerRefusal(
                f"Initialization method {self.init_weights} not implemented. "
                "Use 'torch', 'truncnormal', or 'truncnormal002'."
            )
        self.apply(init_trunc_normal_zero_bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out


class UpActDownMlp(nn.Module):
    """``fc2(gelu(fc1(x)))``. ``truncnormal002-identity`` starts ``fc2``'s weight at
    zero (its bias is zero too), so the branch starts at zero."""

    def __init__(self, config: UpActDownMLPConfig) -> None:
        super().__init__()
        self.init_weights = config.init_weights
        self.fc1 = nn.Linear(config.input_dim, config.hidden_dim, bias=config.bias)
        self.act = Activation.GELU.build()
        self.fc2 = nn.Linear(config.hidden_dim, config.input_dim, bias=config.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_weights == "torch":
            return
        if self.init_weights not in ("truncnormal002", "truncnormal002-identity"):
            raise PeerRefusal(
                f"Initialization method {self.init_weights} not implemented. "
                "Use 'torch', 'truncnormal', or 'truncnormal002'."
            )
        self.apply(init_trunc_normal_zero_bias)
        if self.init_weights == "truncnormal002-identity":
            nn.init.zeros_(self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act(self.fc1(x)))
        return out
