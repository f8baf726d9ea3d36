"""Move a block of this package to patternc's own modules (``patternc.nn``), weights included.

:func:`to_native` builds the ``patternc.nn`` block of the same architecture
and converts the weights, so it computes what the peer's block computes:

- each bank's (or the tied layer's) ``q``, ``k``, ``v`` rows are fused into
  ``qkv`` (and a perceiver's ``k``, ``v`` into ``kv_proj``);
- the peer's adaLN-Zero modulation (chunks scale, shift, gate; ``x + gate *
  branch``) becomes patternc's (shift, scale, gate; ``x + (1 + gate) *
  branch``): the chunks are reordered and 1 is subtracted from each gate's
  bias; the peer's non-affine norms become affine ones of weight 1, bias 0;
- square banks that mean ``x @ W`` (``square_banks="bmm"``) are transposed,
  since patternc's banks compute ``x @ W.T``.

The patterns are then a plan (a pattern file, :func:`patternc.compile`)
passed to the native block, and the banks are bound by type name:
``types`` lists the domains in the order the peer's calls held them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from patternc import configs as native_configs
from patternc.compat.noether.modeling.modules.attention.anchor_attention.multi_branch import (
    MultiBranchAnchorAttention,
)
from patternc.compat.noether.modeling.modules.blocks import PerceiverBlock, TransformerBlock
from patternc.compat.noether.modeling.modules.untied import (
    SquareBanks,
    UntiedLinear,
    UntiedPerceiverBlock,
    UntiedTransformerBlock,
)
from patternc.nn import blocks as native

__all__ = ["to_native"]


def _banks(layer: nn.Module, transpose: bool) -> list[Tensor]:
    """The weight of a tied linear (one entry) or each bank of an untied one,
    as ``x @ W.T`` matrices."""
    if isinstance(layer, UntiedLinear):
        return [w.T if transpose and layer.square else w for w in layer.weight]
    assert isinstance(layer, nn.Linear)
    return [layer.weight]


def _biases(layer: nn.Module) -> list[Tensor] | None:
    if isinstance(layer, UntiedLinear):
        return None if layer.bias is None else list(layer.bias)
    assert isinstance(layer, nn.Linear)
    return None if layer.bias is None else [layer.bias]


def _linear_state(
    prefix: str, weights: list[Tensor], biases: list[Tensor] | None, untied: bool
) -> dict[str, Tensor]:
    if not untied:
        out = {f"{prefix}.weight": weights[0]}
        if biases is not None:
            out[f"{prefix}.bias"] = biases[0]
        return out
    out = {f"{prefix}.weight.{i}": w for i, w in enumerate(weights)}
    out.update({f"{prefix}.bias.{i}": b for i, b in enumerate(biases or [])})
    return out


def _fused(prefix: str, layers: Sequence[nn.Module], transpose: bool, untied: bool) -> dict[str, Tensor]:
    per_layer = [_banks(layer, transpose) for layer in layers]
    weights = [torch.cat(rows, dim=0) for rows in zip(*per_layer)]
    bias_lists = [_biases(layer) for layer in layers]
    biases = None
    if all(b is not None for b in bias_lists):
        biases = [torch.cat(rows) for rows in zip(*(b for b in bias_lists if b is not None))]
    return _linear_state(prefix, weights, biases, untied)


def _single(prefix: str, layer: nn.Module, transpose: bool, untied: bool) -> dict[str, Tensor]:
    return _linear_state(prefix, _banks(layer, transpose), _biases(layer), untied)


def _norm(prefix: str, norm: nn.LayerNorm) -> dict[str, Tensor]:
    width = norm.normalized_shape[0]
    weight = norm.weight if norm.weight is not None else torch.ones(width)
    bias = norm.bias if norm.bias is not None else torch.zeros(width)
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _modulation(
    block: TransformerBlock | PerceiverBlock, order: list[tuple[int, bool]], widths: list[int]
) -> dict[str, Tensor]:
    """The peer's modulation rows as patternc's: ``order`` lists, for each of
    patternc's chunks, the peer's chunk index and whether it is a gate."""
    assert block.modulation is not None
    projection = cast(nn.Linear, block.modulation.project)
    weights = torch.split(projection.weight, widths, dim=0)
    biases = torch.split(projection.bias, widths, dim=0)
    return {
        "modulation.weight": torch.cat([weights[i] for i, _ in order]),
        "modulation.bias": torch.cat([biases[i] - 1.0 if gate else biases[i] for i, gate in order]),
    }


def _mlp_state(block: nn.Module, transpose: bool, untied: bool) -> dict[str, Tensor]:
    mlp: Any = block.mlp
    if untied:
        state: dict[str, Tensor] = {}
        for j, layer in enumerate(mlp.layers):
            state.update(_single(f"mlp.layers.{j}", layer, transpose=False, untied=True))
        return state
    return {
        **_single("mlp.layers.0", mlp.fc1, transpose, untied=False),
        **_single("mlp.layers.1", mlp.fc2, transpose, untied=False),
    }


def _scales(block: nn.Module) -> dict[str, Tensor]:
    out = {}
    for peer, ours in (("ls1", "scale1"), ("ls2", "scale2")):
        gamma = getattr(block, peer).gamma
        if gamma is not None:
            out[f"{ours}.gamma"] = gamma
    return out


def _config(block: TransformerBlock | PerceiverBlock) -> dict[str, Any]:
    peer = block.config
    if peer.layerscale == 0.0:
        raise ValueError(
            "layerscale=0.0 (a closed branch) has no patternc equivalent: patternc's layer_scale is > 0"
        )
    return {
        "hidden_dim": peer.hidden_dim,
        "num_heads": peer.num_heads,
        "mlp_hidden_dim": peer.mlp_hidden_dim,
        "layer_scale": peer.layerscale,
        "bias": peer.bias,
        "eps": peer.eps,
        "use_rope": peer.use_rope,
        "condition_dim": peer.condition_dim,
        "init_weights": "torch",
    }


def to_native(
    block: nn.Module, types: Sequence[str] | None = None, square_banks: SquareBanks = "linear"
) -> nn.Module:
    """The ``patternc.nn`` block that computes what ``block`` (a
    ``TransformerBlock``, ``UntiedTransformerBlock``, ``PerceiverBlock`` or
    ``UntiedPerceiverBlock`` of this package, weights loaded) computes.

    Args:
        block: the block to convert.
        types: for untied blocks, the type (domain) names in the order the
            peer's calls held them (its bank ``i`` is ``types[i]``), e.g.
            ``["surface", "volume"]``.
        square_banks: what ``block``'s square banks mean (see
            :func:`~patternc.compat.noether.set_square_banks`); ``"as_peer"``
            depends on each call's counts and cannot be converted.

    Returns:
        The native block in the same train/eval mode. Call it the native way:
        ``block(x, token_specs, plan, freqs=..., condition=c)`` for transformer
        blocks, ``block(x, kv, token_specs, q_freqs=..., kv_freqs=...,
        condition=c)`` for perceivers.

    Raises:
        ValueError: ``square_banks="as_peer"``, an untied block without
            ``types``, or a block patternc has no equivalent of.
    """
    if square_banks == "as_peer":
        raise ValueError(
            "square_banks='as_peer' depends on each call's counts; convert with 'linear' or 'bmm'"
        )
    transpose = square_banks == "bmm"
    untied = isinstance(block, (UntiedTransformerBlock, UntiedPerceiverBlock))
    if untied and types is None:
        raise ValueError(
            "an untied block needs types=[...]: the domain names in the order the peer's calls held them"
        )
    if isinstance(block, TransformerBlock):
        out = _transformer(block, types, transpose, untied)
    elif isinstance(block, PerceiverBlock):
        out = _perceiver(block, types, transpose, untied)
    else:
        raise ValueError(f"to_native converts transformer and perceiver blocks, not {type(block).__name__}")
    return out.train(block.training)


def _transformer(
    block: TransformerBlock, types: Sequence[str] | None, transpose: bool, untied: bool
) -> nn.Module:
    config = native_configs.TransformerBlockConfig(**_config(block))
    target: nn.Module
    if untied:
        target = native.UntiedTransformerBlock(
            native_configs.UntiedTransformerBlockConfig(transformer_block=config, num_types=len(types or ())),
            types,
        )
    else:
        target = native.TransformerBlock(config)
    attention = block.attention_block
    if isinstance(attention, MultiBranchAnchorAttention):
        attention = attention.mixed_attention
    q, k, v, proj = (getattr(attention, n) for n in ("q", "k", "v", "proj"))
    state = {
        **_norm("norm1", block.norm1),
        **_norm("norm2", block.norm2),
        **_fused("attention.qkv", [q, k, v], transpose, untied),
        **_single("attention.proj", proj, transpose, untied),
        **_mlp_state(block, transpose, untied),
        **_scales(block),
    }
    if block.modulation is not None:
        hidden = block.config.hidden_dim
        # peer: scale1 shift1 gate1 scale2 shift2 gate2 -> patternc: shift1 scale1 gate1 shift2 scale2 gate2
        order = [(1, False), (0, False), (2, True), (4, False), (3, False), (5, True)]
        state.update(_modulation(block, order, [hidden] * 6))
    _load(target, state)
    return target


def _perceiver(
    block: PerceiverBlock, types: Sequence[str] | None, transpose: bool, untied: bool
) -> nn.Module:
    fields = _config(block)
    kv_dim = block.norm1kv.normalized_shape[0]
    config = native_configs.PerceiverBlockConfig(**fields, kv_dim=kv_dim)
    target: nn.Module
    if untied:
        target = native.UntiedPerceiverBlock(
            native_configs.UntiedPerceiverBlockConfig(
                perceiver_block_config=config, num_types=len(types or ())
            ),
            types,
        )
    else:
        target = native.PerceiverBlock(config)
    attn: Any = block.attn
    state = {
        **_norm("norm1", block.norm1q),
        **_norm("norm_kv", block.norm1kv),
        **_norm("norm2", block.norm2),
        **_single("attention.q_proj", attn.q, transpose, untied),
        **_fused("attention.kv_proj", [attn.k, attn.v], transpose, untied=False),
        **_single("attention.out_proj", attn.proj, transpose, untied),
        **_mlp_state(block, transpose, untied),
        **_scales(block),
    }
    if block.modulation is not None:
        hidden = fields["hidden_dim"]
        # peer: q_scale q_shift kv_scale kv_shift attn_gate mlp_scale mlp_shift mlp_gate
        # patternc: shift1 scale1 gate1 shift2 scale2 gate2 shift_kv scale_kv
        order = [(1, False), (0, False), (4, True), (6, False), (5, False), (7, True), (3, False), (2, False)]
        widths = [hidden, hidden, kv_dim, kv_dim, hidden, hidden, hidden, hidden]
        state.update(_modulation(block, order, widths))
    _load(target, state)
    return target


def _load(target: nn.Module, state: dict[str, Tensor]) -> None:
    own = target.state_dict()
    extra = {k: v for k, v in own.items() if k.endswith("_extra_state")}
    with torch.no_grad():
        target.load_state_dict({**extra, **{k: v.detach().clone() for k, v in state.items()}}, strict=True)
