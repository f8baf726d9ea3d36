"""Pieces every executor shares: gathering segments, masks for rule
modifiers, one attention call, and putting call outputs back in input order.

Tensors are token-major, ``[B, N, H, D]``: a group's tokens are a slice along
dim 1 whatever the head layout, and the fused QKV projection yields this
layout without a copy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.lower.layout import Call, KeySpace, Layout, Segment
from patternc.modifiers import Modifiers, band_allows, pair_band
from patternc.nn.tables import build_positions, group_positions, table

__all__ = [
    "AttentionInputs",
    "Executor",
    "TokenSplit",
    "alibi_bias",
    "assemble",
    "attend",
    "call_bias",
    "call_pair_mask",
    "compact_keys",
    "device_capability",
    "expand_keys",
    "gather",
    "gather_mask",
    "group_positions",
    "modifier_args",
    "modifier_mask",
    "once",
    "within_group_positions",
    "zero_padding",
    "zeros_from",
]


@dataclass(frozen=True)
class AttentionInputs:
    """What every executor gets: ``q``/``k``/``v`` are ``[B, N, H, D]`` for the
    input tokens, ``cache`` maps cached groups to ``[B, n, H, D]`` keys and
    values, ``key_padding_mask`` is ``[B, N]`` (True = real token) or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    layout: Layout
    cache: Mapping[str, tuple[Tensor, Tensor]]
    key_padding_mask: Tensor | None
    dropout_p: float
    scale: float | None
    alibi_slopes: Tensor | None = None
    """``[H]``: ALiBi adds ``-slope * |i - j|`` to each score, ``i``/``j`` the
    query's and key's positions within their groups (an additive bias)."""
    keys_compact: bool = False
    """``k``/``v`` hold only the layout's key space, ``[B, Nk, H, D]`` (see
    :class:`~patternc.lower.layout.KeySpace`): what a layer hands over when it
    projects K and V for key tokens only. ``key_padding_mask`` stays ``[B, N]``."""

    def in_token_space(self) -> AttentionInputs:
        """These inputs with K and V ``[B, N, H, D]``: for executors that read
        keys at input positions. Non-key tokens get zeros, never read."""
        if not self.keys_compact:
            return self
        space = self.layout.key_space
        return dataclasses.replace(
            self, k=expand_keys(self.k, space), v=expand_keys(self.v, space), keys_compact=False
        )

    @property
    def differentiated(self) -> bool:
        """Whether this call will be differentiated: autograd is on and Q, K
        or V takes a gradient (kernel choices differ for training)."""
        return torch.is_grad_enabled() and (
            self.q.requires_grad or self.k.requires_grad or self.v.requires_grad
        )

    @property
    def cached_keys(self) -> dict[str, Tensor]:
        return {name: kv[0] for name, kv in self.cache.items()}

    @property
    def cached_values(self) -> dict[str, Tensor]:
        return {name: kv[1] for name, kv in self.cache.items()}


_T = TypeVar("_T")


Executor = Callable[[AttentionInputs], Tensor]
"""An executor maps :class:`AttentionInputs` to the ``[B, N, H, D]`` output."""


def once(answer: Callable[[], _T]) -> Callable[[], _T]:
    """``answer`` asked on the first call and remembered: for questions about
    the installation (a torch version's module, an optional package) that
    compiled layers ask too. A closure over a list, because Dynamo warns
    about every ``functools.cache`` it traces through.

    The remembered question is marked a constant function for Dynamo
    (``torch.compiler.assume_constant_result``, a mark read only while
    tracing): inside a ``torch.compile`` trace it runs as plain Python and
    its answer becomes a constant of the graph, because probing the
    installation there (``importlib.util.find_spec``, a failed import)
    breaks the graph and a layer may be compiled before it ever runs
    eagerly. So an answer a compiled layer may ask first must be a constant
    Dynamo can hold (a bool, a str, None)."""
    memo: list[_T] = []

    def remembered() -> _T:
        if not memo:
            memo.append(answer())
        return memo[0]

    functools.update_wrapper(remembered, answer)  # its docstring; ``__wrapped__`` asks afresh
    marked: Callable[[], _T] = torch.compiler.assume_constant_result(remembered)  # type: ignore[no-untyped-call,unused-ignore]
    return marked


_CAPABILITY: dict[int, tuple[int, int]] = {}
"""CUDA device index -> its compute capability (asked once per device)."""


def device_capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, asked of the driver once per
    device (the kernel choices of ``flex`` and FlashAttention 4 read it on
    every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITY.get(index)
    if capability is None:
        capability = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return capability


def compact_keys(t: Tensor, space: KeySpace, dim: int = 1) -> Tensor:
    """The key space's tokens of ``t`` (tokens along ``dim``): ``t`` itself
    when every token is a key, a view for one run of keys, else one split and
    one concatenation (whose backward is one concatenation too, where slices
    would each pay a whole-size gradient)."""
    if space.identity:
        return t
    if not space.ranges:
        return t.narrow(dim, 0, 0)
    if len(space.ranges) == 1:
        ((start, stop),) = space.ranges
        return t.narrow(dim, start, stop - start)
    pieces = t.split_with_sizes(space.split_sizes, dim)
    return torch.cat([pieces[i] for i in space.kept], dim)


def expand_keys(t: Tensor, space: KeySpace) -> Tensor:
    """``[B, Nk, ...]`` in key space -> ``[B, N, ...]`` in token space, zeros
    at tokens that are not keys (the inverse of :func:`compact_keys`)."""
    if space.identity:
        return t
    if not space.ranges:
        return t.new_zeros(t.shape[0], space.n_tokens, *t.shape[2:])
    kept = iter(t.split_with_sizes([space.split_sizes[i] for i in space.kept], 1))
    keep = set(space.kept)
    parts = [
        next(kept) if i in keep else t.new_zeros(t.shape[0], n, *t.shape[2:])
        for i, n in enumerate(space.split_sizes)
    ]
    return torch.cat(parts, dim=1)


def gather(t: Tensor, segments: Sequence[Segment], cache: Mapping[str, Tensor]) -> Tensor:
    """The tokens of ``segments`` along dim 1: a view for one input segment,
    else one concatenation."""
    parts = [t[:, s.start : s.stop] if s.cached is None else cache[s.cached] for s in segments]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return t[:, :0]
    return torch.cat(parts, dim=1)


class TokenSplit:
    """A ``[B, N, ...]`` tensor split once along its tokens at every segment
    boundary of a layout; segments are read as pieces of that one split.

    Why not slices: autograd's backward of each slice allocates a zero tensor
    of the whole input and copies its gradient in, so ``n`` segments cost ``n``
    full-size passes (64 documents: 64 x the input, 40x slower than this on
    CPU). One split's backward is one concatenation of the pieces' gradients.
    """

    def __init__(
        self, t: Tensor, layout: Layout, keys: bool = False, dim: int = 1, compact: bool = False
    ) -> None:
        """``keys``: split at the key/value segments' boundaries (else the
        queries'); ``dim``: the token dim (2 for head-major ``[B, H, N, D]``
        views); ``compact``: ``t`` holds the key space only (pieces of
        non-keys are empty, so pieces keep the token space's indices). The
        split happens on the first :meth:`take` (stacked views never need it)."""
        self.tensor = t
        self._sizes, self._ranges = layout.key_pieces if keys else layout.query_pieces
        if compact:
            self._sizes = layout.key_space.piece_sizes
        self._dim = dim
        self._pieces: tuple[Tensor, ...] = ()

    @property
    def pieces(self) -> tuple[Tensor, ...]:
        """The split (made on first use), indexed like the layout's piece ranges."""
        if not self._pieces:
            sizes = self._sizes
            t = self.tensor
            self._pieces = tuple(t.split_with_sizes(sizes, self._dim)) if len(sizes) > 1 else (t,)
        return self._pieces

    def take(self, segments: Sequence[Segment], cache: Mapping[str, Tensor]) -> Tensor:
        """The tokens of ``segments``: a piece for one input segment, else one concatenation."""
        parts: list[Tensor] = []
        for s in segments:
            if s.cached is not None:
                parts.append(cache[s.cached])
                continue
            pieces = self.pieces
            first, stop = self._ranges[(s.start, s.stop)]
            parts.extend(pieces[first:stop])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self.tensor.narrow(self._dim, 0, 0)
        return torch.cat(parts, dim=self._dim)


def gather_mask(mask: Tensor | None, segments: Sequence[Segment]) -> Tensor | None:
    """Key padding for ``segments`` (cached keys are never padding)."""
    if mask is None:
        return None
    return gather(mask, [s for s in segments if s.cached is None], {})


def within_group_positions(layout: Layout, device: torch.device) -> Tensor:
    """``[N]``: each input token's index within its group. Built once per
    device with no host synchronisation (kept in the layout's tables), so
    later calls are free and CUDA-graph capturable (warm up before
    capturing: the first call copies the sizes to the device)."""
    sizes = layout.input_sizes
    return table(layout, ("positions", device), lambda: build_positions(sizes, device))


def modifier_mask(modifiers: Modifiers, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``[Lq, Lk]`` bool: which pairs ``modifiers`` allow, for positions
    within groups (or, under ``across``, positions in the input)."""
    return band_allows(pair_band(modifiers), q_pos[:, None], k_pos[None, :])  # type: ignore[no-any-return]


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``[H, Lq, Lk]`` ALiBi bias ``-slope * |i - j|`` (positions within groups)."""
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance


def _segment_positions(
    segments: Sequence[Segment], positions: Tensor, cache: Mapping[str, tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """Within-group positions of each segment (cached keys count from 0)."""
    return [
        positions[s.start : s.stop]
        if s.cached is None
        else torch.arange(cache[s.cached][0].shape[1], device=positions.device)
        for s in segments
    ]


def _input_positions(segment: Segment, like: Tensor) -> Tensor:
    """The input token indices of an input segment, on ``like``'s device."""
    return torch.arange(segment.start, segment.stop, device=like.device)


def call_positions(
    call: Call, positions: Tensor, cache: Mapping[str, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Within-group positions of a call's queries and keys (cached keys count from 0)."""
    q_parts = _segment_positions(call.queries, positions, cache)
    k_parts = _segment_positions(call.keys, positions, cache)
    return _cat(q_parts, positions), _cat(k_parts, positions)


def _cat(parts: list[Tensor], like: Tensor) -> Tensor:
    return torch.cat(parts) if parts else like[:0]


def call_bias(
    call: Call,
    positions: Tensor | None,
    cache: Mapping[str, tuple[Tensor, Tensor]],
    slopes: Tensor | None,
) -> Tensor | None:
    """A call's ALiBi bias ``[H, Lq, Lk]``, or None without ALiBi."""
    if slopes is None:
        return None
    assert positions is not None
    return alibi_bias(slopes, *call_positions(call, positions, cache))


def call_pair_mask(
    call: Call, positions: Tensor, cache: Mapping[str, tuple[Tensor, Tensor]]
) -> Tensor | None:
    """``[Lq, Lk]``: the pairs a call's per-key modifiers allow (None when it
    has none); each key segment is masked by its own modifiers."""
    if not call.has_modifiers:
        return None
    q_pos = _cat(_segment_positions(call.queries, positions, cache), positions)
    k_parts = _segment_positions(call.keys, positions, cache)
    q_input: Tensor | None = None  # the queries' places in the input, for keys under `across`
    masks = []
    for seg, k_pos in zip(call.keys, k_parts):
        if not seg.modifiers.restricts:
            masks.append(torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device))
        elif seg.modifiers.across:  # the layout refuses `across` on cached keys: this segment is input
            if q_input is None:
                q_input = _cat([_input_positions(s, positions) for s in call.queries], positions)
            masks.append(modifier_mask(seg.modifiers, q_input, _input_positions(seg, positions)))
        else:
            masks.append(modifier_mask(seg.modifiers, q_pos, k_pos))
    if not masks:  # every key group empty at these sizes
        return torch.ones(q_pos.shape[0], 0, dtype=torch.bool, device=q_pos.device)
    return torch.cat(masks, dim=1)


def modifier_args(
    call: Call,
    positions: Tensor | None,
    cache: Mapping[str, tuple[Tensor, Tensor]],
    padded: bool,
) -> tuple[Tensor | None, bool]:
    """``(pair_mask, is_causal)`` for a call: plain ``[causal]`` between single
    groups is SDPA's ``is_causal`` (no mask built); other modifiers give a mask."""
    if not call.has_modifiers:
        return None, False
    if call.is_causal and not padded:
        return None, True
    assert positions is not None
    return call_pair_mask(call, positions, cache), False


def zero_padding(k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """K and V with padded tokens zeroed: a masked key still enters the
    matrix products with weight 0, and ``0 * inf`` is NaN, so garbage in a
    padded token (a data loader's fill value) would poison every query."""
    if key_padding_mask is None:
        return k, v
    pad = ~key_padding_mask[:, :, None, None]
    return k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)


def zeros_from(t: Tensor) -> Tensor:
    """Zeros shaped like ``t`` that stay in its autograd graph: a call with no
    keys still gives its queries' projections a (zero) gradient, not None
    (DDP's unused-parameter check), and a NaN in ``t`` does not leak through."""
    return t.masked_fill(torch.ones((), dtype=torch.bool, device=t.device), 0.0)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    pair_mask: Tensor | None = None,
    is_causal: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention on ``[b, L, H, D]`` tensors.

    ``kv_mask`` is ``[b, Lkv]`` (True = attend); ``pair_mask`` is ``[Lq, Lkv]``
    or ``[b, Lq, Lkv]`` (a rule's modifiers); ``bias`` is an additive
    ``[H, Lq, Lkv]`` or ``[b, H, Lq, Lkv]`` score bias (ALiBi). A query with no
    key left, or a call with no keys at all, yields zeros rather than NaN.
    """
    if k.shape[1] == 0:
        return zeros_from(q)
    attn_mask = kv_mask[:, None, None, :] if kv_mask is not None else None
    if pair_mask is not None:
        pairs = pair_mask[:, None] if pair_mask.dim() == 3 else pair_mask[None, None]
        attn_mask = pairs if attn_mask is None else attn_mask & pairs
    keep = None
    if attn_mask is not None:
        keep = attn_mask.any(dim=-1, keepdim=True)  # [b|1, 1, Lq|1, 1]; no host sync
        attn_mask = attn_mask | ~keep
    if bias is not None:
        bias = (bias[None] if bias.dim() == 3 else bias).to(q.dtype)
        if is_causal and attn_mask is None:
            n_q, n_k = q.shape[1], k.shape[1]
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
        is_causal=is_causal and attn_mask is None,
    )
    if keep is not None:
        out = out * keep.to(out.dtype)
    return out.transpose(1, 2)


def assemble(outputs: Sequence[Tensor | None], layout: Layout, like: Tensor) -> Tensor:
    """Call outputs -> ``[B, N, H, D]`` in input order (one concatenation);
    None for a call that was not launched because it reads nothing.
    A call with several query segments has its output split, not sliced: one
    backward pass for it, not one whole-size gradient per segment."""
    split: dict[int, tuple[Tensor, ...]] = {}
    pieces = []
    for call, index in layout.output_order:
        out = outputs[call]
        queries = layout.calls[call].queries
        if out is None:  # a call that reads nothing (`inputs -> nothing`): zeros
            pieces.append(like.new_zeros(like.shape[0], queries[index].length, *like.shape[2:]))
            continue
        if len(queries) == 1:
            pieces.append(out)
            continue
        if call not in split:
            split[call] = tuple(out.split_with_sizes([s.length for s in queries], 1))
        pieces.append(split[call][index])
    if not pieces:
        return like[:, :0]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=1)
