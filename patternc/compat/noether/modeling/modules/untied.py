"""The peer's untied (per-token-type) modules on patternc's untied core
(``noether.modeling.modules.untied``).

Banks are bound as the peer binds them: by *position* in each call. The
groups of ``token_specs`` with tokens are cut into domains (the first
``_``-separated word of the name, see ``TokenSpec.domain``); domains must be
consecutive, and the ``i``-th domain of the call uses bank ``i``. A call with
fewer domains than banks uses the first banks (the untied blocks refuse such
a call, as the peer's do).

Parameters are the peer's: each ``UntiedLinear`` holds ``weight`` (and
``bias``), an ``nn.ParameterList`` of one 2-D parameter per bank.

**Square banks.** For a bank with ``input_dim == output_dim`` the peer
computes ``x @ W`` on its batched paths (taken when the domains' token counts
are equal, or within 10% of it) and ``x @ W.T`` on its loop path (unbalanced
counts). ``square_banks`` picks which one this package computes:

- ``"linear"`` (default): ``x @ W.T`` always, like ``nn.Linear`` and the peer's
  loop path: right for checkpoints trained on unbalanced counts;
- ``"bmm"``: ``x @ W`` always for square banks: right for checkpoints trained
  on balanced counts (the peer's AB-UPT recipe samples equal anchor counts);
- ``"as_peer"``: whichever the peer takes for each call's counts: the peer's
  numbers call for call, including its inconsistency.

Set it per layer (``UntiedLinear(config, square_banks=...)``) or for a whole
model with :func:`set_square_banks`. A layer in ``"linear"`` mode that has
loaded a state dict warns once (:class:`SquareBankWarning`) the first time a
call has counts for which the peer would have computed ``x @ W``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from patternc import Layout
from patternc.compat.noether.core.schemas.modules.attention import (
    AttentionConfig,
    AttentionPattern,
    TokenSpec,
)
from patternc.compat.noether.core.schemas.modules.layers import LinearProjectionConfig
from patternc.compat.noether.core.schemas.modules.untied import (
    UntiedLinearConfig,
    UntiedMixedAttentionConfig,
    UntiedMLPConfig,
    UntiedPerceiverBlockConfig,
    UntiedTransformerBlockConfig,
)
from patternc.compat.noether.modeling.modules.activations import Activation
from patternc.compat.noether.modeling.modules.attention.anchor_attention.mixed import (
    KVCache,
    MixedAttention,
    as_specs,
)
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)
from patternc.compat.noether.modeling.modules.attention.perceiver import PerceiverAttention
from patternc.compat.noether.modeling.modules.blocks.perceiver import PerceiverBlock
from patternc.compat.noether.modeling.modules.blocks.transformer import TransformerBlock
from patternc.compat.noether.refusals import PeerRefusal
from patternc.configs import LinearProjectionConfig as _CoreLinearProjectionConfig
from patternc.configs import UntiedLinearConfig as _CoreUntiedLinearConfig
from patternc.nn import UntiedLinear as _CoreUntiedLinear
from patternc.nn.untied import TypeRuns

__all__ = [
    "SquareBankWarning",
    "SquareBanks",
    "UntiedLinear",
    "UntiedMLP",
    "UntiedMixedAttention",
    "UntiedPerceiverAttention",
    "UntiedPerceiverBlock",
    "UntiedTransformerBlock",
    "peer_takes_bmm",
    "set_square_banks",
]

SquareBanks = Literal["linear", "bmm", "as_peer"]
"""What a square bank computes: ``x @ W.T`` (``"linear"``), ``x @ W`` (``"bmm"``),
or whichever the peer computes for the call's counts (``"as_peer"``)."""

_SQUARE_BANKS = ("linear", "bmm", "as_peer")


class SquareBankWarning(UserWarning):
    """A loaded checkpoint's square banks meet counts the peer computes ``x @ W`` for."""


class _Group(NamedTuple):
    name: str
    size: int


def _domain_banks(token_specs: Sequence[Any]) -> list[tuple[str, int, int]]:
    """``(group, size, bank)`` for the groups with tokens: bank ``i`` is the
    ``i``-th domain of the call; a domain that reappears after another is an error."""
    out: list[tuple[str, int, int]] = []
    seen: list[str] = []
    for spec in token_specs:
        if not spec.size:
            continue
        domain = spec.name.split("_")[0]
        if not seen or seen[-1] != domain:
            if domain in seen:
                raise ValueError(
                    f"Domain '{domain}' is not consecutive in token_specs. "
                    "Specs for the same domain must be adjacent."
                )
            seen.append(domain)
        out.append((spec.name, spec.size, len(seen) - 1))
    return out


def _domain_group_sizes(token_specs: Sequence[Any]) -> list[int]:
    """Tokens per domain, in the order the domains appear (the peer's helper of this name)."""
    sizes: list[int] = []
    for _, size, bank in _domain_banks(token_specs):
        if bank == len(sizes):
            sizes.append(0)
        sizes[bank] += size
    return sizes


def peer_takes_bmm(
    sizes: Sequence[int], batch: int, dtype: torch.dtype, device: torch.device, bias: bool = True
) -> bool:
    """Whether the peer's ``UntiedLinear`` runs a call with these per-domain
    token counts on a batched path (``x @ W`` for square banks): equal counts,
    or padding them to the largest costs at most 10% more tokens. In
    bfloat16 it first tries ``grouped_mm``, which takes no bias (torch 2.13,
    CPU and CUDA): a layer without biases goes batched there for equal counts
    or a batch of one."""
    if not sizes:
        return False
    equal = all(s == sizes[0] for s in sizes)
    if dtype == torch.bfloat16 and not bias and (equal or batch == 1):
        return True
    return equal or max(sizes) * len(sizes) <= 1.1 * sum(sizes)


def set_square_banks(module: nn.Module, mode: SquareBanks) -> nn.Module:
    """Set ``square_banks`` on every ``UntiedLinear`` of ``module`` (see the
    module docs for which mode a checkpoint needs). Returns ``module``.

    Raises:
        ValueError: ``mode`` is not one of ``"linear"``, ``"bmm"``, ``"as_peer"``.
    """
    if mode not in _SQUARE_BANKS:
        raise ValueError(f"square_banks must be one of {list(_SQUARE_BANKS)}, got {mode!r}")
    for layer in module.modules():
        if isinstance(layer, UntiedLinear):
            layer.square_banks = mode
    return module


def _runs(groups: Sequence[tuple[str, int, int]]) -> TypeRuns:
    runs: list[tuple[int, int, int]] = []
    start = 0
    for _, size, bank in groups:
        if runs and runs[-1][0] == bank:
            runs[-1] = (bank, runs[-1][1], start + size)
        else:
            runs.append((bank, start, start + size))
        start += size
    return TypeRuns(tuple(runs), start)


class UntiedLinear(_CoreUntiedLinear):
    """A linear layer with one weight bank per domain: ``forward(x, token_specs)``.

    ``weight``/``bias`` are ``nn.ParameterList``\\ s of 2-D/1-D parameters, one per
    bank (the peer's layout and state-dict keys ``weight.0``, ``bias.0``, ...).
    ``square_banks``: see the module docs.
    """

    # the peer's state dict holds no bank binding: save none (binding is by position)
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, config: UntiedLinearConfig, *, square_banks: SquareBanks = "linear") -> None:
        proj = config.linear_projection
        if proj.init_weights not in ("torch", "truncnormal", "truncnormal002", "zeros"):
            raise PeerRefusal(
                f"Initialization method {proj.init_weights!r} not implemented for UntiedLinear."
            )
        if square_banks not in _SQUARE_BANKS:
            raise ValueError(f"square_banks must be one of {list(_SQUARE_BANKS)}, got {square_banks!r}")
        core = _CoreUntiedLinearConfig(
            linear_projection=_CoreLinearProjectionConfig(
                input_dim=proj.input_dim, output_dim=proj.output_dim, bias=proj.bias, init_weights="torch"
            ),
            num_types=config.num_types,
        )
        super().__init__(core, types=[str(i) for i in range(config.num_types)])
        self.init_weights = proj.init_weights
        self.square_banks: SquareBanks = square_banks
        self._loaded = False
        self._warned = False
        self.reset_parameters()

    def reset_parameters(self, *, zero: bool = False) -> None:
        """The peer's modes: ``torch`` (``nn.Linear``'s defaults per bank),
        ``truncnormal``/``truncnormal002`` (std 0.02, zero bias), ``zeros``."""
        mode = self.__dict__.get("init_weights")
        if mode is None:  # called by the core's constructor; initialised once the mode is known
            return
        with torch.no_grad():
            for bank in range(self.num_types):
                weight, bias = self.weight[bank], None if self.bias is None else self.bias[bank]
                if mode == "torch":
                    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                    if bias is not None:
                        bound = 1 / math.sqrt(self.input_dim)
                        nn.init.uniform_(bias, -bound, bound)
                elif mode == "zeros":
                    nn.init.zeros_(weight)
                else:
                    nn.init.trunc_normal_(weight, std=0.02)
                if bias is not None and mode != "torch":
                    nn.init.zeros_(bias)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._loaded = True

    @property
    def square(self) -> bool:
        return self.input_dim == self.output_dim

    def _stacked_weight(self) -> Tensor:
        """The banks stacked ``[num_types, output_dim, input_dim]`` (a new tensor)."""
        return torch.stack(list(self.weight))

    def _stacked_bias(self) -> Tensor | None:
        return None if self.bias is None else torch.stack(list(self.bias))

    def _weight_for_bmm(self) -> Tensor:
        """What the peer's batched paths right-multiply by: ``W.T`` stacked, or ``W`` for square banks."""
        w = self._stacked_weight()
        return w if self.square else w.transpose(-2, -1).contiguous()

    def _transposed(self, sizes: Sequence[int], x: Tensor) -> bool:
        """Whether square banks compute ``x @ W`` for this call."""
        if not self.square:
            return False
        if self.square_banks == "bmm":
            return True
        bmm = peer_takes_bmm(sizes, x.shape[0], x.dtype, x.device, self.bias is not None)
        if self.square_banks == "as_peer":
            return bmm
        if bmm and self._loaded and not self._warned:
            self._warned = True
            warnings.warn(
                f"UntiedLinear {self.input_dim}x{self.output_dim}: for per-domain token counts "
                f"{list(sizes)} the "
                "peer computes x @ W with square banks (x @ W.T here). If the checkpoint was trained on such "
                "balanced counts, set square_banks='bmm' "
                "(patternc.compat.noether.set_square_banks(model, 'bmm')); "
                "see the docs of patternc.compat.noether.modeling.modules.untied",
                SquareBankWarning,
                stacklevel=3,
            )
        return False

    def _apply_groups(self, x: Tensor, groups: Sequence[tuple[str, int, int]], transposed: bool) -> Tensor:
        if not groups:
            return x.new_empty(*x.shape[:-2], 0, self.output_dim)
        banks = 1 + max(bank for _, _, bank in groups)
        if banks > self.num_types:
            raise ValueError(
                f"token_specs hold {banks} domains ({[g for g, _, _ in groups]}) but this layer has "
                f"num_types={self.num_types} weight banks"
            )
        weights = [w.T for w in self.weight] if transposed else list(self.weight)
        biases = None if self.bias is None else list(self.bias)
        return self.run(x, _runs(groups), weights, biases)

    def project(self, x: Tensor, groups: Sequence[tuple[str, int]]) -> Tensor:
        """``x`` holding ``(group, size)`` in order (sizes > 0), banks by domain position."""
        bound = _domain_banks([_Group(g, n) for g, n in groups])
        return self._apply_groups(x, bound, self._transposed(_domain_group_sizes_of(bound), x))

    def forward(self, x: Tensor, token_specs: Sequence[TokenSpec] | Any) -> Tensor:  # type: ignore[override]
        """``x`` ``[B, S, input_dim]`` holding the groups of ``token_specs`` with
        tokens, in order -> ``[B, S, output_dim]``."""
        groups = _domain_banks(as_specs(token_specs))
        return self._apply_groups(x, groups, self._transposed(_domain_group_sizes_of(groups), x))

    # the peer's three strategies, by name (its tests compare them)
    def _split_loop_forward(self, x: Tensor, sizes: list[int], D_out: int) -> Tensor:
        return self._apply_groups(x, _by_bank(sizes), transposed=False)

    def _equal_size_bmm_forward(
        self, x: Tensor, n: int, B: int, S: int, D_in: int, D_out: int, T: int
    ) -> Tensor:
        return self._apply_groups(x, _by_bank([n] * T), transposed=self.square)

    def _padded_bmm_forward(
        self, x: Tensor, sizes: list[int], B: int, S: int, D_in: int, D_out: int, T: int, max_n: int
    ) -> Tensor:
        return self._apply_groups(x, _by_bank(sizes), transposed=self.square)

    def extra_repr(self) -> str:
        dims = f"{self.input_dim} -> {self.output_dim}"
        return f"{dims}, num_types={self.num_types}, square_banks={self.square_banks}"


def _by_bank(sizes: Sequence[int]) -> list[tuple[str, int, int]]:
    return [(f"#{bank}", size, bank) for bank, size in enumerate(sizes) if size]


def _domain_group_sizes_of(groups: Sequence[tuple[str, int, int]]) -> list[int]:
    sizes: list[int] = []
    for _, size, bank in groups:
        if bank == len(sizes):
            sizes.append(0)
        sizes[bank] += size
    return sizes


class UntiedMLP(nn.Module):
    """``MLPConfig``'s topology with an :class:`UntiedLinear` per layer (``layers``)."""

    def __init__(self, config: UntiedMLPConfig) -> None:
        super().__init__()
        mlp = config.mlp
        dims = [mlp.input_dim] + [mlp.hidden_dim] * (mlp.num_layers + 1) + [mlp.output_dim]
        self.layers = nn.ModuleList(
            UntiedLinear(
                UntiedLinearConfig(
                    num_types=config.num_types,
                    linear_projection=LinearProjectionConfig(
                        input_dim=a, output_dim=b, init_weights=mlp.init_weights
                    ),
                )
            )
            for a, b in itertools.pairwise(dims)
        )
        self.activation = Activation[mlp.activation].build()

    def forward(self, x: Tensor, token_specs: Sequence[TokenSpec] | Any) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, token_specs)
            if i < last:
                x = self.activation(x)
        return x


class UntiedMixedAttention(MixedAttention):
    """``MixedAttention`` with per-domain ``q``, ``k``, ``v``, ``proj`` (each an
    :class:`UntiedLinear`); attention runs across all tokens by patternc's core.
    ``forward(x, token_specs, attention_patterns, key_padding_mask=None,
    freqs=None, kv_cache=None)`` returns the output tensor alone, as the
    peer's does; a ``kv_cache`` is refused (the peer has none here)."""

    def __init__(self, config: UntiedMixedAttentionConfig) -> None:
        super().__init__(config)
        projection = config.projection_config
        self.q = UntiedLinear(projection)  # type: ignore[assignment]
        self.k = UntiedLinear(projection)  # type: ignore[assignment]
        self.v = UntiedLinear(projection)  # type: ignore[assignment]
        self.proj = UntiedLinear(projection)  # type: ignore[assignment]

    def reset_parameters(self) -> None:
        return  # each UntiedLinear initialises itself by the config's mode

    @staticmethod
    def _groups(layout: Layout) -> list[tuple[str, int]]:
        return [(g, n) for g, n in zip(layout.input_groups, layout.input_sizes) if n]

    def _untied(self, name: str) -> UntiedLinear:
        return cast(UntiedLinear, getattr(self, name))

    def _project_in(self, x: Tensor, layout: Layout, patterns: object) -> Tensor:
        groups = self._groups(layout)
        return torch.cat([self._untied(n).project(x, groups) for n in ("q", "k", "v")], dim=-1)

    def _project_back(self, out: Tensor, layout: Layout, patterns: object) -> Tensor:
        return self._untied("proj").project(out, self._groups(layout))

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        token_specs: Sequence[TokenSpec] | Any,
        attention_patterns: Sequence[AttentionPattern],
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        if kv_cache is not None:
            raise PeerRefusal("UntiedMixedAttention does not yet support kv caching.")
        specs = as_specs(token_specs)
        _domain_banks(specs)  # the peer's order check, before any work
        out, _ = self._attend_specs(x, specs, attention_patterns, key_padding_mask, freqs, None)
        return out


def _token_specs(attn_kwargs: dict[str, Any] | None, block: str) -> list[TokenSpec]:
    if attn_kwargs is None or attn_kwargs.get("token_specs") is None:
        raise ValueError(f"attn_kwargs must be provided with 'token_specs' key for {block}.")
    return as_specs(attn_kwargs["token_specs"])


def _check_domains(specs: Sequence[TokenSpec], num_types: int) -> None:
    domains = len(_domain_group_sizes(specs))
    if domains != num_types:
        raise ValueError(
            f"Number of domains in token_specs ({domains}) must match num_types ({num_types}): the banks "
            "are bound by position, so every call must hold every domain, in the same order"
        )


class UntiedTransformerBlock(TransformerBlock):
    """``TransformerBlock`` with per-domain attention projections and MLP.

    With an anchor attention (``attention_constructor`` set to an anchor
    class) its inner ``mixed_attention`` becomes an :class:`UntiedMixedAttention`
    (``attention_block.mixed_attention.q.weight.0``, ...); otherwise
    ``attention_block`` itself is one. ``attn_kwargs["token_specs"]`` is required.
    """

    def __init__(self, config: UntiedTransformerBlockConfig) -> None:
        super().__init__(config.transformer_block)
        self.num_types = config.num_types
        self.mlp = UntiedMLP(config.untied_mlp_config)
        untied = UntiedMixedAttention(config.attention_config)
        if isinstance(self.attention_block, MultiBranchAnchorAttention):
            self.attention_block.mixed_attention = untied
        else:
            self.attention_block = untied

    def forward(
        self, x: Tensor, condition: Tensor | None = None, attn_kwargs: dict[str, Any] | None = None
    ) -> tuple[Tensor, Any]:
        _check_domains(_token_specs(attn_kwargs, "UntiedTransformerBlock"), self.num_types)
        return super().forward(x, condition=condition, attn_kwargs=attn_kwargs)

    def _mlp_forward(self, x: Tensor, attn_kwargs: dict[str, Any] | None = None) -> Tensor:
        out: Tensor = self.mlp(x, _token_specs(attn_kwargs, "UntiedTransformerBlock"))
        return out


class UntiedPerceiverAttention(PerceiverAttention):
    """``PerceiverAttention`` with per-domain ``q`` and ``proj``; ``k``/``v`` shared.
    ``forward(q, token_specs, kv=None, attn_mask=None, q_freqs=None,
    k_freqs=None, kv_cache=None)`` returns ``(out, new_kv_cache)``."""

    def __init__(self, config: AttentionConfig, num_types: int) -> None:
        super().__init__(config)
        hidden = self.num_heads * self.head_dim

        def untied(bias: bool) -> UntiedLinear:
            geometry = LinearProjectionConfig(
                input_dim=hidden, output_dim=hidden, bias=bias, init_weights=self.init_weights
            )
            return UntiedLinear(UntiedLinearConfig(num_types=num_types, linear_projection=geometry))

        self.q = untied(self.q.bias is not None)  # type: ignore[assignment]
        self.proj = untied(self.proj.bias is not None)  # type: ignore[assignment]

    def _project_q(self, q: Tensor, token_specs: object) -> Tensor:
        out: Tensor = self.q(q, token_specs)
        return out

    def _project_out(self, x: Tensor, token_specs: object) -> Tensor:
        out: Tensor = self.proj(x, token_specs)
        return out

    def forward(  # type: ignore[override]
        self,
        q: Tensor,
        token_specs: Sequence[TokenSpec] | Any,
        kv: Tensor | None = None,
        attn_mask: Tensor | None = None,
        q_freqs: Tensor | None = None,
        k_freqs: Tensor | None = None,
        kv_cache: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return self._attend(q, token_specs, kv, attn_mask, q_freqs, k_freqs, kv_cache)


class UntiedPerceiverBlock(PerceiverBlock):
    """``PerceiverBlock`` with per-domain Q/output projections and MLP; the K/V
    projection is shared. ``attn_kwargs["token_specs"]`` says which domains ``q`` holds."""

    def __init__(self, config: UntiedPerceiverBlockConfig) -> None:
        block = config.perceiver_block_config
        super().__init__(block)
        self.num_types = config.num_types
        self.attn = UntiedPerceiverAttention(block.perceiver_attention_config, num_types=config.num_types)
        self.mlp = UntiedMLP(config.untied_mlp_config)

    def forward(
        self,
        q: Tensor,
        kv: Tensor | None = None,
        condition: Tensor | None = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Any]:
        specs = _token_specs(attn_kwargs, "UntiedPerceiverBlock")
        _check_domains(specs, self.num_types)
        kwargs = {k: v for k, v in (attn_kwargs or {}).items() if k != "token_specs"}
        return self._forward(q, kv, condition, kwargs, specs)
