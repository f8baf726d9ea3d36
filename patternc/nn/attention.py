"""Attention modules with the seed API: ``DotProductAttention``,
``MixedAttention`` and ``PatternAttention`` (a module that holds a plan)."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternc.lower.layout import Layout
from patternc.nn.context import active
from patternc.nn.executors import AttentionInputs, Executor, get_executor
from patternc.nn.executors.common import compact_keys, zero_padding
from patternc.nn.rope import apply_rope
from patternc.nn.rows import RowSizes, is_per_row, rows_of
from patternc.nn.schedule import schedule_for
from patternc.nn.traced_layouts import in_trace, layout_of, plan_for_rows, token_specs_of
from patternc.plan import Plan, Sizes
from patternc.schemas import (
    AttentionConfig,
    AttentionPattern,
    Implementation,
    InitWeightsMode,
    MixedAttentionConfig,
    TokenSpecs,
)

__all__ = [
    "DotProductAttention",
    "KVCache",
    "MixedAttention",
    "PatternAttention",
    "check_batched",
    "init_linear",
    "keep_in_graph",
    "plain_sizes",
]

KVCache = dict[str, dict[str, Tensor]]
"""``{group: {"k": keys, "v": values}}``, each ``[batch, num_kv_heads, n_tokens, head_dim]``
(the layout of ``scaled_dot_product_attention``; ``num_kv_heads`` is
``num_heads`` unless the layer shares K/V heads, GQA); keys are stored after
RoPE and ``qk_norm``. Every attention layer reads and writes this one shape:
``MixedAttention`` and its subclasses, the ``Transformer`` stack's layers
(their outputs, chunked inference's recorded context, ``generate``'s cache)."""


def init_linear(layer: nn.Linear, mode: InitWeightsMode, *, zero: bool = False) -> None:
    """Initialise a linear layer: ``torch`` keeps PyTorch's default,
    ``truncnormal002`` / ``zero`` draw from a truncated normal (std 0.02),
    ``xavier_uniform`` is Xavier, ``zeros`` zeros everything; biases start at
    zero. ``zero=True`` (the output projection under ``"zero"``) zeros the weight."""
    if mode == "torch":
        return
    if zero or mode == "zeros":
        nn.init.zeros_(layer.weight)
    elif mode == "xavier_uniform":
        nn.init.xavier_uniform_(layer.weight)
    else:
        nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class DotProductAttention(nn.Module):
    """Multi-head attention with a fused QKV projection.

    Options from :class:`~patternc.AttentionConfig`: ``head_dim`` (defaults to
    ``hidden_dim // num_heads``), ``bias``, ``dropout`` (on attention weights
    and output, in training), ``qk_norm`` (LayerNorm over each head of Q and
    K), ``use_rope`` (rotate Q and K by ``freqs``), ``init_weights``.
    ``num_kv_heads`` (default ``num_heads``) shares each K/V head among
    ``num_heads // num_kv_heads`` query heads (GQA/MQA); the fused projection
    then has ``(num_heads + 2 * num_kv_heads) * head_dim`` rows: Q, K, V.

    >>> attn = DotProductAttention(AttentionConfig(hidden_dim=32, num_heads=4))
    >>> attn(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: AttentionConfig, *, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim or config.hidden_dim // config.num_heads
        self.num_kv_heads = num_kv_heads or config.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "each K/V head serves the same number of query heads"
            )
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_dim, inner + 2 * self.kv_inner, bias=config.bias)
        self.proj = nn.Linear(inner, config.hidden_dim, bias=config.bias)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.output_dropout = config.dropout  # on the projected output; a subclass may set it apart
        self.use_rope = config.use_rope
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # the seed's layers project q, k and v separately: fuse them into `qkv`
        # (rows q, then k, then v: the order split_heads reads), tied
        # ([out, in]) or untied ([num_types, out, in], stacked)
        for name in ("weight", "bias"):
            parts = [f"{prefix}{p}.{name}" for p in ("q", "k", "v")]
            if all(p in state_dict for p in parts) and f"{prefix}qkv.{name}" not in state_dict:
                state_dict[f"{prefix}qkv.{name}"] = torch.cat(
                    [state_dict.pop(p) for p in parts], dim=-2 if name == "weight" else -1
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def kv_inner(self) -> int:
        """Width of K (and of V) in the fused projection: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def reset_parameters(self) -> None:
        init_linear(self.qkv, self.config.init_weights)
        init_linear(self.proj, self.config.init_weights, zero=self.config.init_weights == "zero")

    def project_qkv(self, x: Tensor, freqs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, hidden]`` -> token-major Q ``[B, N, H, D]`` and K, V
        ``[B, N, H_kv, D]`` (views of one fused projection), with qk_norm and
        RoPE applied."""
        return self.split_heads(self.qkv(x), freqs)

    def split_heads(
        self,
        qkv: Tensor,
        freqs: Tensor | None = None,
        kv: Tensor | None = None,
        key_freqs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused ``[B, N, (H + 2 * H_kv) * D]`` -> Q ``[B, N, H, D]`` and K, V
        ``[B, N, H_kv, D]``, normed and rotated. With ``kv`` (``[B, Nk, 2 *
        H_kv * D]``, keys projected apart), ``qkv`` is Q alone and K/V are
        ``[B, Nk, H_kv, D]``, rotated by ``key_freqs``."""
        batch, n, _ = qkv.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if kv is None:
            key_freqs = freqs
            if kv_heads == heads:  # one view: the common case costs no split
                q, k, v = qkv.view(batch, n, 3, heads, dim).unbind(dim=2)
            else:
                q_rows, kv = qkv.split_with_sizes((heads * dim, 2 * kv_heads * dim), dim=-1)
                q = q_rows.view(batch, n, heads, dim)
        else:
            q = qkv.view(batch, n, heads, dim)
        if kv is not None:
            k, v = kv.view(batch, kv.shape[1], 2, kv_heads, dim).unbind(dim=2)
        if self.qk_norm:  # else Identity: no module calls on the hot path
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            if freqs is None:
                raise ValueError("use_rope=True needs `freqs` (see patternc.nn.rope_frequencies)")
            assert key_freqs is not None
            q, k = apply_rope(q, freqs), apply_rope(k, key_freqs)
        elif freqs is not None:
            raise ValueError(
                "freqs were given but this layer has use_rope=False, so they would be ignored; "
                "build it with use_rope=True, or drop freqs"
            )
        return q, k, v

    def project_out(self, out: Tensor) -> Tensor:
        """``[B, N, H, D]`` -> ``[B, N, hidden]``."""
        return apply_dropout(self.proj(merge_heads(out)), self.output_dropout, self.training)

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, freqs: Tensor | None = None) -> Tensor:
        """Full attention over ``x`` (``attn_mask`` as in ``scaled_dot_product_attention``)."""
        q, k, v = self.project_qkv(x, freqs)
        k, v = share_heads(k, self.num_heads), share_heads(v, self.num_heads)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout,
        )
        return self.project_out(out.transpose(1, 2))


def plain_sizes(sizes: Sizes) -> Sizes:
    """``sizes`` with every size a Python ``int``: a 0-d integer tensor or a
    NumPy integer becomes one (``int(t)``), so the layout cache, keyed by
    sizes, finds it. A dict of ints (the common case) comes back as it is
    after one pass over its values; anything else is left for the layout's
    own checks, which name what is wrong."""
    if not isinstance(sizes, Mapping):
        return sizes
    for n in sizes.values():
        if type(n) is not int and n is not None:
            return {name: _plain_size(n) for name, n in sizes.items()}
    return sizes


def _plain_size(n: Any) -> Any:
    if n is None or isinstance(n, (int, bool)):
        return n
    try:
        return operator.index(n)  # a 0-d integer tensor, a NumPy integer; not a float
    except TypeError:
        return n


def check_batched(x: Tensor, n_tokens: int, width: int | None, what: str) -> None:
    """Raise a ValueError naming the expected shape when ``x`` is not
    ``[batch, n_tokens, width]`` (``width`` None: ``[batch, n_tokens]``);
    ``what`` describes the groups that make up ``n_tokens``."""
    rank = 2 if width is None else 3
    expected = f"[batch, {n_tokens}]" if width is None else f"[batch, {n_tokens}, {width}]"
    shape = tuple(x.shape)
    if x.dim() == rank - 1 and x.shape[0] == n_tokens and (width is None or x.shape[-1] == width):
        raise ValueError(
            f"x has shape {shape}, which has no batch dimension; expected {expected} for {what}: "
            "add one with x[None] (or x.unsqueeze(0))"
        )
    if x.dim() != rank or x.shape[1] != n_tokens:
        raise ValueError(f"x has shape {shape} but {what} put {n_tokens} tokens in it; expected {expected}")


def _check_x(x: Tensor, layer: nn.Module) -> None:
    """Hidden size of ``x`` against the layer's, with the fix in the message
    (torch's own says ``mat1 and mat2 shapes ...``)."""
    hidden = layer.config.hidden_dim  # type: ignore[union-attr]
    if x.shape[-1] != hidden:
        raise ValueError(
            f"x has hidden size {x.shape[-1]} but this layer was built with hidden_dim={hidden}; "
            "project x to that width or build the layer with the width of x"
        )


def _explain_weights(x: Tensor, layer: nn.Module) -> None:
    """Raise a ValueError naming the fix when the dtype or device of ``x``
    does not match the layer's weights. Called once a projection has failed,
    not on every forward: walking a layer's parameters costs host time."""
    weight = next(layer.parameters(), None)
    if weight is None:
        return
    if x.device != weight.device:
        raise ValueError(
            f"x is on {x.device} but the layer's weights are on {weight.device}; move one of them "
            f"(layer.to({str(x.device)!r}) or x.to({str(weight.device)!r}))"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"x is {x.dtype} but the layer's weights are {weight.dtype}; convert one "
            f"(layer.to({x.dtype}) or x.to({weight.dtype})), or run under torch.autocast"
        )


def apply_dropout(t: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout``, skipped (no dispatch) when it would return ``t`` as it is."""
    return F.dropout(t, p, training) if training and p > 0 else t


def keep_in_graph(out: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``out``, with K and V in its autograd graph when they hold no token:
    no executor reads them then, and the layers that made them (the K/V
    projection, ``k_norm``) would get ``None`` gradients where the docs
    promise zeros (DDP's unused-parameter check). The sum of an empty tensor
    is an exact 0, so the output is unchanged."""
    if k.shape[1]:
        return out
    return out + (k.sum() + v.sum()).to(out.dtype)


def share_heads(t: Tensor, heads: int) -> Tensor:
    """Token-major K or V ``[B, N, H_kv, D]`` with each head repeated for the
    ``heads // H_kv`` query heads it serves (GQA): ``[B, N, heads, D]``, the
    shape every executor reads. ``t`` itself when the heads already match."""
    repeat = heads // t.shape[2]
    return t if repeat == 1 else t.repeat_interleave(repeat, 2)


def merge_heads(out: Tensor) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, N, H * D]``."""
    return out.reshape(out.shape[0], out.shape[1], out.shape[2] * out.shape[3])


def _read_cache(
    kv_cache: KVCache | None, layout: Layout, q: Tensor, kv_heads: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Check the cache entries the layout reads (:data:`KVCache`, ``kv_heads``
    heads); return them token-major with the query's heads (:func:`share_heads`)."""
    if not layout.cached_groups:
        if kv_cache is not None and not any(slot.cached for slot in layout.slots):
            raise ValueError(
                f"kv_cache was given (groups {sorted(kv_cache)}) but no group has size None, so "
                "nothing would read it; give the cached groups size None in token_specs, or drop kv_cache"
            )
        return {}
    if kv_cache is None:
        raise ValueError(
            f"groups {list(layout.cached_groups)} have size=None, so their keys/values must come "
            "from kv_cache, but kv_cache is None"
        )
    batch, _, query_heads, dim = q.shape
    heads = kv_heads
    out = {}
    for name in layout.cached_groups:
        entry = kv_cache.get(name)
        if entry is None or "k" not in entry or "v" not in entry:
            raise ValueError(
                f"kv_cache has no entry {name!r} with 'k' and 'v' (it has {sorted(kv_cache)}); "
                "pass the new_kv_cache returned by a call with that group in x"
            )
        k, v = entry["k"], entry["v"]
        for key, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != batch or t.shape[1] != heads or t.shape[3] != dim:
                raise ValueError(
                    f"kv_cache[{name!r}][{key!r}] has shape {tuple(t.shape)}; expected "
                    f"[batch={batch}, heads={heads}, tokens, head_dim={dim}]"
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(
                    f"kv_cache[{name!r}][{key!r}] is {t.dtype} on {t.device}; the queries are "
                    f"{q.dtype} on {q.device}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"kv_cache[{name!r}] has {k.shape[2]} keys but {v.shape[2]} values")
        out[name] = (share_heads(k.transpose(1, 2), query_heads), share_heads(v.transpose(1, 2), query_heads))
    return out


class MixedAttention(DotProductAttention):
    """Attention in which token groups attend along given patterns.

    ``x`` holds the groups of ``token_specs`` whose ``size`` is not None, in
    that order. Each pattern says which groups' queries attend to which
    groups' keys/values; the patterns must be exhaustive and non-overlapping
    over the input groups (checked once per layout with
    :func:`patternc.check_patterns`). ``attention_patterns`` may also be a
    compiled :class:`patternc.Plan`.

    The executor is ``config.implementation``: ``batched`` (default),
    ``loop`` or ``dense`` (see :data:`patternc.schemas.Implementation`), or
    ``executor`` where given (an executor with its options bound, such as
    FlexAttention's block size). ``num_kv_heads``: see
    :class:`DotProductAttention`; the cache then holds ``num_kv_heads`` heads.

    >>> from patternc import AttentionPattern as P, MixedAttentionConfig, TokenSpec as T
    >>> attn = MixedAttention(MixedAttentionConfig(hidden_dim=16, num_heads=2))
    >>> specs = [T("anchors", 4), T("queries", 3)]
    >>> out, cache = attn(torch.randn(1, 7, 16), specs, [P(["anchors", "queries"], ["anchors"])])
    >>> out.shape, sorted(cache)
    (torch.Size([1, 7, 16]), ['anchors'])
    """

    config: MixedAttentionConfig

    def __init__(
        self,
        config: MixedAttentionConfig | AttentionConfig,
        *,
        num_kv_heads: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        if not isinstance(config, MixedAttentionConfig):
            config = MixedAttentionConfig(**config.model_dump())
        super().__init__(config, num_kv_heads=num_kv_heads)
        self.executor = executor or get_executor(config.implementation)

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        token_specs: TokenSpecs,
        attention_patterns: Plan | Sequence[AttentionPattern],
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Returns ``(output, new_kv_cache)``: output like ``x``; the new cache
        holds the K/V of every input group used as keys/values (views into
        this call's tensors, layout of :data:`KVCache`), or is None when some
        group was read from ``kv_cache``."""
        specs = token_specs_of(token_specs)
        layout = schedule_for(specs, attention_patterns)
        return self._attend(x, layout, attention_patterns, key_padding_mask, freqs, kv_cache)

    def _attend(
        self,
        x: Tensor,
        layout: Layout,
        attention_patterns: Plan | Sequence[AttentionPattern],
        key_padding_mask: Tensor | None,
        freqs: Tensor | None,
        kv_cache: KVCache | None,
        alibi_slopes: Tensor | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """The forward pass once the layout is known (plain tensor work: the
        layout is looked up, never rebuilt, so ``torch.compile`` traces this
        without graph breaks). ``alibi_slopes`` (``[num_heads]``): the
        executor adds ALiBi's bias (see :class:`AttentionInputs`)."""
        if x.dim() != 3 or x.shape[1] != layout.n_tokens:
            groups = ", ".join(f"{g}={n}" for g, n in zip(layout.input_groups, layout.input_sizes))
            check_batched(
                x, layout.n_tokens, self.config.hidden_dim,
                f"the sizes ({groups}; only groups whose size is not None are in x)",
            )  # fmt: skip
        _check_x(x, self)
        if key_padding_mask is not None:
            if layout.cached_groups or kv_cache is not None:
                raise ValueError(
                    "key_padding_mask cannot be combined with a KV cache (cached tokens are assumed real); "
                    "drop the padding or run without the cache"
                )
            if key_padding_mask.shape != x.shape[:2] or key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"key_padding_mask must be bool [batch, n_tokens] = {list(x.shape[:2])}, got "
                    f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}"
                )
        context = active(layout.tables.traced)
        recorder, sharding = context.cache, context.sharding
        # a recording pass and the sharded runner index K/V by input position:
        # token space; a chunk of queries reading the anchors projects no K/V at all
        recording = recorder is not None and recorder.recording
        keys_apart = not layout.key_space.identity and not recording and sharding is None
        try:
            q, k, v, key_padding, compact = self._project(
                x, layout, attention_patterns, freqs, key_padding_mask, keys_apart
            )
        except RuntimeError:
            _explain_weights(x, self)  # torch's message, e.g. "mat1 and mat2 must have the same dtype"
            raise
        if recorder is not None:
            if recording:
                recorder.check(self, layout)
            elif kv_cache is None:
                kv_cache = recorder.load(self)
        cache = _read_cache(kv_cache, layout, q, self.num_kv_heads)
        k_in, v_in = zero_padding(k, v, key_padding)
        heads = self.num_heads
        inputs = AttentionInputs(
            q, share_heads(k_in, heads), share_heads(v_in, heads), layout, cache, key_padding_mask,
            self.attention_dropout, None, alibi_slopes, compact,
        )  # fmt: skip
        new_cache = None
        if sharding is None:
            out = keep_in_graph(self.executor(inputs), k, v)
            if not layout.cached_groups:
                new_cache = _new_cache(k, v, layout, compact)
        else:
            # sharded: the cache holds the groups this rank now has in full
            # (gathered anchors; every key group when a chunked run records)
            out, full = sharding.attend(inputs, self.executor, recording)
            if not layout.cached_groups:
                # the executor's K/V carry each K/V head once per query head
                # it serves (share_heads): every `repeat`-th is the cache's
                repeat = self.num_heads // self.num_kv_heads
                new_cache = {
                    g: {name: t[:, :, ::repeat].transpose(1, 2) for name, t in zip("kv", kv)}
                    for g, kv in full.items()
                    if g in layout.key_value_groups
                }
        if recording and new_cache is not None:
            assert recorder is not None
            recorder.store(self, new_cache)
        out = self._project_back(merge_heads(out), layout, attention_patterns)
        return apply_dropout(out, self.output_dropout, self.training), new_cache

    def _project(
        self,
        x: Tensor,
        layout: Layout,
        patterns: object,
        freqs: Tensor | None,
        key_padding_mask: Tensor | None,
        keys_apart: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
        """Q, K, V (normed, rotated), the key padding mask of K's tokens, and
        whether K/V hold the key space only: with ``keys_apart``, K/V are
        projected for the layout's key tokens (see
        :class:`~patternc.lower.layout.KeySpace`) where this layer can."""
        apart = self._project_apart(x, layout, patterns) if keys_apart else None
        if apart is None:
            q, k, v = self.split_heads(self._project_in(x, layout, patterns), freqs)
            return q, k, v, key_padding_mask, False
        space = layout.key_space
        key_freqs = freqs  # of a wrong shape: apply_rope explains it on Q first
        if freqs is not None and freqs.dim() >= 2 and freqs.shape[-2] == layout.n_tokens:
            key_freqs = compact_keys(freqs, space, dim=-2)
        q, k, v = self.split_heads(apart[0], freqs, apart[1], key_freqs)
        key_padding = None if key_padding_mask is None else compact_keys(key_padding_mask, space)
        return q, k, v, key_padding, True

    def _project_in(self, x: Tensor, layout: Layout, patterns: object) -> Tensor:
        """The fused QKV projection (untied subclasses pick weights per token type)."""
        return self.qkv(x)  # type: ignore[no-any-return]

    def _project_apart(self, x: Tensor, layout: Layout, patterns: object) -> tuple[Tensor, Tensor] | None:
        """Q for every token ``[B, N, H * D]`` and K/V for the layout's key
        space only ``[B, Nk, 2 * H * D]``, from the rows of the fused weight
        (the parameters and checkpoints stay ``qkv``); None where a subclass
        projects only fused."""
        if type(self.qkv) is not nn.Linear:
            return None
        rows = (self.num_heads * self.head_dim, 2 * self.kv_inner)
        q_weight, kv_weight = self.qkv.weight.split_with_sizes(rows)  # one op each: host time counts
        q_bias, kv_bias = (None, None) if self.qkv.bias is None else self.qkv.bias.split_with_sizes(rows)
        return F.linear(x, q_weight, q_bias), F.linear(compact_keys(x, layout.key_space), kv_weight, kv_bias)

    def _project_back(self, out: Tensor, layout: Layout, patterns: object) -> Tensor:
        return self.proj(out)  # type: ignore[no-any-return]


def _new_cache(k: Tensor, v: Tensor, layout: Layout, compact: bool = False) -> KVCache:
    """Views of each key/value group's K and V (one split per tensor: a
    64-group layout pays two calls, not 256 slices, on every forward).
    ``compact``: K/V hold the key space, the key/value groups end to end."""
    if compact:
        sizes = [layout.input_sizes[i] for i in layout.key_value_indices]
        indices: Sequence[int] = range(len(sizes))
    else:
        sizes, indices = list(layout.input_sizes), layout.key_value_indices
    keys = k.transpose(1, 2).split_with_sizes(sizes, dim=2)
    values = v.transpose(1, 2).split_with_sizes(sizes, dim=2)
    groups = zip(layout.key_value_groups, indices)
    return {name: {"k": keys[index], "v": values[index]} for name, index in groups}


class PatternAttention(MixedAttention):
    """``MixedAttention`` bound to one compiled plan, so a model calls
    ``attn(x, sizes)`` with ``sizes`` a ``{group: size}`` dict or a list of
    ``TokenSpec``. ``backend`` overrides ``config.implementation``.

    ``sizes`` may also be a list of dicts, one per row of ``x``, where rows
    hold different groups or sizes (packed documents, images and texts of
    different lengths): ``x`` is ``[B, N_max, hidden]``, each row's tokens
    from position 0 and right-padded; each row attends as it would alone,
    the padding is read by no query and its output is zero (see
    :mod:`patternc.nn.rows`). Such a call returns no cache (None).

    >>> import patternc
    >>> plan = patternc.compile("groups a q\\n* -> a").patterns["default"]
    >>> attn = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
    >>> out, _ = attn(torch.randn(1, 5, 8), {"a": 2, "q": 3})
    >>> out.shape
    torch.Size([1, 5, 8])
    """

    def __init__(
        self,
        config: MixedAttentionConfig | AttentionConfig,
        plan: Plan,
        backend: Implementation | None = None,
    ) -> None:
        if backend is not None:
            fields = {**config.model_dump(), "implementation": backend}
            config = MixedAttentionConfig(**fields)
        super().__init__(config)
        self.plan = plan

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        sizes: Sizes | RowSizes,
        key_padding_mask: Tensor | None = None,
        freqs: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Returns ``(output, new_kv_cache)`` as :meth:`MixedAttention.forward`
        does; with one sizes dict per row, ``key_padding_mask`` is
        ``[B, N_max]``, ``freqs`` ``[N_max, D/2]`` or ``[B, N_max, D/2]``, and
        the cache None.

        Raises:
            ValueError: with one dict per row: a list whose length is not the
                batch, a row holding more tokens than ``x`` has positions, a
                size that is not an integer >= 0, or a ``kv_cache``.
            PatternError: sizes that do not fit the plan (for one row: the
                message names it).
        """
        if is_per_row(sizes):
            return self._attend_rows(x, sizes, key_padding_mask, freqs, kv_cache)
        layout = layout_of(self.plan, plain_sizes(sizes))  # type: ignore[arg-type]
        return self._attend(x, layout, self.plan, key_padding_mask, freqs, kv_cache)

    def _attend_rows(
        self,
        x: Tensor,
        sizes: RowSizes,
        key_padding_mask: Tensor | None,
        freqs: Tensor | None,
        kv_cache: KVCache | None,
    ) -> tuple[Tensor, None]:
        """Rows of different layouts: their real tokens, end to end, through
        the plan stacked once per row, scattered back to ``x``'s shape."""
        if kv_cache is not None:
            raise ValueError(
                "kv_cache cannot be combined with one sizes dict per row (every group of a row is in x); "
                "run the row alone with its dict to read a cache"
            )
        rows = rows_of(sizes, x.shape, x.device, in_trace())
        plan = plan_for_rows(self.plan, rows.names)
        layout = layout_of(plan, rows.sizes)
        key_padding_mask = rows.gather_mask(key_padding_mask)
        if freqs is not None:
            freqs = rows.gather_freqs(freqs)
        out, _ = self._attend(rows.gather(x), layout, plan, key_padding_mask, freqs, None)
        return rows.scatter(out), None

    def extra_repr(self) -> str:
        return f"plan={self.plan.name!r}, implementation={self.config.implementation!r}"
