"""The transformer stack: :class:`Transformer` and a small :class:`VisionTransformer`.

Every layer's attention runs a compiled pattern. A model is built from a
:class:`~patternc.TransformerConfig` and, optionally, a pattern program and a
per-layer schedule of its patterns, e.g. ``["self_anchor", "cross_anchor"] * 2
+ ["joint"]``. Without a program the stack uses one group ``tokens`` that
attends to itself. ``causal=True`` and ``attention_window`` add ``[causal]`` /
``[causal, window N]`` to every rule; the executor comes from
``attention_type`` (:data:`~patternc.stack_config.ATTENTION_TYPES`).

>>> import torch
>>> from patternc import TransformerConfig
>>> config = TransformerConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64,
...                            causal=True, pos_emb_type="rope", dropout_rate=0.0)
>>> model = Transformer(config)
>>> ids = torch.randint(1, 50, (2, 7))
>>> model(ids).shape
torch.Size([2, 7, 50])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternc.compiler import compile as compile_program
from patternc.configs import LinearProjectionConfig, UntiedLinearConfig, UntiedMixedAttentionConfig
from patternc.ir import KeyGroup, KeyRun, Keys, ResolvedRule
from patternc.lower.layout import Layout
from patternc.modifiers import Modifiers
from patternc.nn.attention import (
    KVCache,
    MixedAttention,
    apply_dropout,
    check_batched,
    merge_heads,
    plain_sizes,
    share_heads,
)
from patternc.nn.context import active
from patternc.nn.executors import Executor, get_executor
from patternc.nn.executors.common import group_positions
from patternc.nn.executors.flex import run_flex
from patternc.nn.executors.linear import run_linear
from patternc.nn.rope import rope_frequencies
from patternc.nn.rows import RowSizes, is_per_row, rows_of
from patternc.nn.traced_layouts import in_trace, layout_of, plan_for_rows
from patternc.nn.untied import (
    TypeBinding,
    TypeRuns,
    UntiedLinear,
    UntiedMixedAttention,
    UntiedPath,
    check_types,
    layout_type_runs,
)
from patternc.plan import Plan, Program, Sizes, sizes_key
from patternc.schemas import MixedAttentionConfig
from patternc.stack_config import TransformerConfig, VisionTransformerConfig

__all__ = ["Transformer", "TransformerLayer", "VisionTransformer", "alibi_slopes"]

_DEFAULT_SOURCE = "groups tokens\ntokens -> tokens\n"


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes: a geometric sequence from ``2^(-8/n)`` (Press et
    al.), extended by interleaving for head counts that are not powers of two."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(powers(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(powers(closest) + extra)


def with_modifiers(plan: Plan, extra: Modifiers) -> Plan:
    """``plan`` with ``extra`` merged into every rule's modifiers (the stack's
    ``causal`` / ``attention_window``); a rule's own window, if tighter, stays."""
    if not extra:
        return plan

    lists: dict[Modifiers, Modifiers] = {}  # one tightened list per distinct list, shared as in binding

    def tightened(key: KeyGroup) -> KeyGroup:
        mods = lists.get(key.modifiers)
        if mods is None:
            mods = lists[key.modifiers] = key.modifiers.tighten(extra)
        return KeyGroup(key.name, mods)

    done: dict[int, KeyRun] = {}  # each run of keys once: bound families' rules share them
    rules = tuple(
        ResolvedRule(r.queries, Keys.of(r.keys).mapped(tightened, done), r.span, r.text, r.where, r.to_self)
        for r in plan.rules
    )
    return Plan(plan.name, plan.groups, rules, plan.group_types)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.weight


def _norm(config: TransformerConfig) -> nn.Module:
    return RMSNorm(config.d_model) if config.norm_type == "rms" else nn.LayerNorm(config.d_model)


_UNTIED_PATH: UntiedPath = "per_type"
"""How the stack's untied linears run: one ``F.linear`` per run of a type
(each type gathered once where its runs are many). The stack's calls are
host-bound at small widths, where ``segments``' in-place autograd function
costs more host time per call than the copies it saves."""


def _linear(d_in: int, d_out: int, types: TypeBinding | None) -> nn.Linear | UntiedLinear:
    """``d_in -> d_out`` with PyTorch's initialisation: one ``nn.Linear``, or
    an :class:`~patternc.nn.untied.UntiedLinear` with a bank per bound type."""
    if types is None:
        return nn.Linear(d_in, d_out)
    geometry = LinearProjectionConfig(input_dim=d_in, output_dim=d_out, init_weights="torch")
    return UntiedLinear(
        UntiedLinearConfig(linear_projection=geometry, num_types=types.num_types), types, _UNTIED_PATH
    )


def _executor(config: TransformerConfig) -> Executor:
    """The executor of ``attention_type``, with the stack's options bound."""
    if config.implementation == "linear":
        return functools.partial(run_linear, chunk_size=config.linear_attention_chunk_size)
    if config.implementation == "flex":
        return functools.partial(run_flex, block_size=config.attention_block_size)
    return get_executor(config.implementation)


def _attention(config: TransformerConfig, types: TypeBinding | None) -> MixedAttention:
    """A layer's attention: the stack's geometry as a ``MixedAttention`` (an
    ``UntiedMixedAttention`` with a weight bank per type), PyTorch's
    initialisation, RoPE where ``pos_emb_type="rope"``, GQA heads."""
    fields: dict[str, Any] = dict(
        hidden_dim=config.d_model, num_heads=config.num_heads, head_dim=config.head_dim,
        use_rope=config.pos_emb_type == "rope", dropout=config.dropout_rate, init_weights="torch",
        implementation=config.implementation,
    )  # fmt: skip
    executor = _executor(config)
    if types is None:
        return MixedAttention(MixedAttentionConfig(**fields), num_kv_heads=config.kv_heads, executor=executor)
    untied = UntiedMixedAttentionConfig(**fields, num_types=types.num_types)
    return UntiedMixedAttention(
        untied, types, path=_UNTIED_PATH, num_kv_heads=config.kv_heads, executor=executor
    )


class _FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig, types: TypeBinding | None) -> None:
        super().__init__()
        self.gated = config.ff_activation in ("swiglu", "geglu")
        width = 2 * config.d_ff if self.gated else config.d_ff
        self.up = _linear(config.d_model, width, types)
        self.down = _linear(config.d_ff, config.d_model, types)
        activations: dict[str, Callable[[Tensor], Tensor]] = {
            "gelu": F.gelu,
            "relu": F.relu,
            "swiglu": F.silu,
            "geglu": F.gelu,
        }
        self.act = activations[config.ff_activation]
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, runs: TypeRuns | None) -> Tensor:
        """``runs``: the tokens' weight banks (None: tied layers)."""
        h = self.up(x) if runs is None else self.up(x, runs)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        h = apply_dropout(h, self.dropout, self.training)
        return self.down(h) if runs is None else self.down(h, runs)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Step:
    """What every layer of one forward pass shares (built once per pass)."""

    layouts: Mapping[str, Layout]
    plans: Mapping[str, Plan]
    runs: TypeRuns | None
    """The tokens' weight banks, for the feed-forward (None: tied layers)."""
    freqs: Tensor | None
    key_padding_mask: Tensor | None
    alibi: Tensor | None


_Attention = Callable[[Tensor], tuple[Tensor, KVCache | None]]

_RENAMED_BANKS = (("out_proj", "attention.proj"), ("ff.up", "ff.up"), ("ff.down", "ff.down"))
"""Per-bank ``nn.Linear`` modules of earlier checkpoints (``NAME.layers.BANK``)
and the layers that hold their banks now."""


class TransformerLayer(nn.Module):
    """One block: attention over a pattern, then the feed-forward; pre- or post-norm.

    The attention is :class:`~patternc.nn.MixedAttention`, or with ``n_types
    > 1`` :class:`~patternc.nn.UntiedMixedAttention` (one projection bank per
    token type, ``types`` naming them in bank order or sharing a binding), run
    on the layout of the layer's pattern: the one attention core of patternc,
    and its :data:`~patternc.nn.attention.KVCache` shape. The feed-forward's
    linears are untied the same way.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pattern: str,
        n_types: int,
        types: Sequence[str] | TypeBinding | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.pattern = pattern
        binding = check_types(types, n_types) if n_types > 1 else None
        self.attention = _attention(config, binding)
        self.ff = _FeedForward(config, binding)
        self.norm1, self.norm2 = _norm(config), _norm(config)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # earlier checkpoints: one nn.Linear per bank (`q_proj.layers.BANK`,
        # `kv_proj...`, `out_proj...`, `ff.up...`, `ff.down...`); Q and K/V
        # rows are the fused projection's, in that order
        banks = "" if isinstance(self.attention.qkv, nn.Linear) else ".{bank}"
        n_types = 1 if not banks else self.attention.config.num_types  # type: ignore[attr-defined]
        for param in ("weight", "bias"):
            for bank in range(n_types):
                suffix = banks.format(bank=bank)
                q, kv = (f"{prefix}{name}.layers.{bank}.{param}" for name in ("q_proj", "kv_proj"))
                if q in state_dict and kv in state_dict:
                    fused = torch.cat([state_dict.pop(q), state_dict.pop(kv)])
                    state_dict[f"{prefix}attention.qkv.{param}{suffix}"] = fused
                for old, new in _RENAMED_BANKS:
                    value = state_dict.pop(f"{prefix}{old}.layers.{bank}.{param}", None)
                    if value is not None:
                        state_dict[f"{prefix}{new}.{param}{suffix}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def executor(self) -> Executor:
        """The executor the attention runs (``attention_type``'s)."""
        return self.attention.executor

    def qkv(self, x: Tensor, step: _Step) -> tuple[Tensor, Tensor, Tensor]:
        """Token-major Q ``[B, N, H, D]`` and K, V ``[B, N, H_kv, D]`` of every
        token of ``x`` (RoPE applied), by the attention's projection."""
        patterns = step.plans[self.pattern]
        qkv = self.attention._project_in(x, step.layouts[self.pattern], patterns)
        return self.attention.split_heads(qkv, step.freqs)

    def attend(self, x: Tensor, step: _Step) -> tuple[Tensor, KVCache | None]:
        """The attention branch over ``x`` (normed): its output and the
        :data:`~patternc.nn.attention.KVCache` of the pattern's key/value
        groups (None where a group was read from a cache)."""
        return self.attention._attend(
            x, step.layouts[self.pattern], step.plans[self.pattern], step.key_padding_mask, step.freqs,
            None, step.alibi,
        )  # fmt: skip

    def decode(
        self, x: Tensor, step: _Step, cache: KVCache, position: int, first: int, bias: Tensor | None
    ) -> Tensor:
        """The attention branch of one new token ``x`` (``[B, 1, d_model]``,
        normed) at ``position``: its K/V written into ``cache`` (the one
        group's entries, ``[B, H_kv, kv_cache_max_len, D]``), its query
        attending to positions ``first .. position`` (``bias``: ALiBi's)."""
        q, k, v = self.qkv(x, step)
        (entry,) = cache.values()
        entry["k"][:, :, position], entry["v"][:, :, position] = k[:, 0], v[:, 0]
        heads = self.attention.num_heads
        keys, values = (
            share_heads(window.transpose(1, 2), heads)
            for window in (entry["k"][:, :, first : position + 1], entry["v"][:, :, first : position + 1])
        )
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=bias
        ).transpose(1, 2)
        layout, patterns = step.layouts[self.pattern], step.plans[self.pattern]
        return self.attention._project_back(merge_heads(attended), layout, patterns)

    def forward(self, x: Tensor, step: _Step) -> tuple[Tensor, KVCache | None]:
        return self.residual(x, lambda h: self.attend(h, step), step.runs)

    def residual(
        self, x: Tensor, attention: _Attention, runs: TypeRuns | None
    ) -> tuple[Tensor, KVCache | None]:
        """The block around ``attention`` (pre- or post-norm residuals and the
        feed-forward); decoding passes its cache attention here."""
        if self.config.use_pre_norm:
            attended, kv = attention(self.norm1(x))
            x = x + attended
            return x + self.ff(self.norm2(x), runs), kv
        attended, kv = attention(x)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff(x, runs)), kv


class Transformer(nn.Module):
    """A stack of :class:`TransformerLayer` s whose attention runs compiled patterns.

    ``program``: a :class:`~patternc.Program`, a :class:`~patternc.Plan`, pattern
    source text, or None (one group ``tokens``). ``layer_patterns``: the
    pattern each layer runs (default: the program's first pattern everywhere).
    ``forward(x, sizes)``: ``x`` is ``[B, N]`` token ids (``vocab_size`` set) or
    ``[B, N, d_model]`` features; ``sizes`` maps groups to token counts in
    ``x`` order, which is the plan's (another order raises E404; omit it for
    the single-group default). Ids equal to ``pad_token_id`` are masked as
    keys (``pad_token_id=None``: none are). With ``config.untied``, each token
    type (the pattern file's ``types``) has its own projections and
    feed-forward weights. Token models return logits (tied to the embedding).
    """

    alibi: Tensor

    def __init__(
        self,
        config: TransformerConfig,
        program: Program | Plan | str | None = None,
        layer_patterns: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        plans = _plans(program)
        extra = Modifiers(causal=config.is_causal, window=config.attention_window)
        self.plans = {name: with_modifiers(plan, extra) for name, plan in plans.items()}
        first = next(iter(self.plans))
        self.layer_patterns = list(layer_patterns or [first] * config.num_layers)
        unknown = [p for p in self.layer_patterns if p not in self.plans]
        if unknown or len(self.layer_patterns) != config.num_layers:
            raise ValueError(
                f"layer_patterns must name one of {sorted(self.plans)} for each of the "
                f"{config.num_layers} layers; got {self.layer_patterns}"
            )
        self.type_names = tuple(dict.fromkeys(t for p in self.plans.values() for t in p.types.values()))
        n_types = len(self.type_names) if config.untied else 1
        # the layers' banks: tied where there is one type
        types = TypeBinding(n_types, self.type_names) if n_types > 1 else None
        self._banks = None if types is None else self.type_names
        if config.vocab_size is not None:
            # std d^-1/2: the sqrt(d)-scaled inputs have unit variance and the
            # tied output logits start near unit scale
            self.embed: nn.Module = nn.Embedding(config.vocab_size, config.d_model)
            nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)
        else:
            self.embed = nn.Identity()
        self.layers = nn.ModuleList(TransformerLayer(config, p, n_types, types) for p in self.layer_patterns)
        self.final_norm: nn.Module = _norm(config) if config.use_pre_norm else nn.Identity()
        self.register_buffer("alibi", alibi_slopes(config.num_heads), persistent=False)

    # ------------------------------------------------------------- plumbing

    def _default_sizes(self, n: int) -> dict[str, int]:
        """One group holds every token: the only group, or one member of the only family."""
        groups = next(iter(self.plans.values())).groups
        if len(groups) != 1:
            raise ValueError(f"pass sizes: the patterns have groups {list(groups)}")
        name = groups[0]
        return {name[:-1] + "0" if name.endswith("*") else name: n}

    def _positions(
        self, sizes: Mapping[str, int | None], device: torch.device, traced: bool = False
    ) -> Tensor:
        """Each token's position within its group (global ones when sharded;
        counted from the chunk's first token when a chunk of queries runs);
        ``traced``: inside a ``torch.compile`` trace (nothing is stored)."""
        context = active(traced)
        sharding, recorder = context.sharding, context.cache
        present = {g: n for g, n in sizes.items() if n is not None}
        if sharding is not None:
            positions = sharding.local_positions(device)
        elif recorder is not None and not recorder.recording and recorder.offsets:
            if recorder.sharded and self.config.pos_emb_type in ("rope", "sinusoidal"):
                raise ValueError(
                    f'pos_emb_type="{self.config.pos_emb_type}" reads each query\'s position in its '
                    "group, which a rank's part of the queries does not carry in chunked inference "
                    "with context_parallel; run chunked without context_parallel, or use "
                    'pos_emb_type="none"'
                )
            parts = [torch.arange(n, device=device) + recorder.offsets.get(g, 0) for g, n in present.items()]
            positions = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
        else:
            positions = group_positions(tuple(present.values()), device, store=not traced)
        self._check_lengths(present)
        return positions

    def _check_lengths(self, sizes: Mapping[str, int]) -> None:
        """Refuse a group longer than the positions the stack encodes (none
        with ``pos_emb_type="none"``), naming the group and the setting."""
        c = self.config
        if c.pos_emb_type == "none":
            return
        limit, setting = c.max_len, "max_len"
        if c.pos_emb_type == "rope":
            limit = c.rope_positions
            setting = "rope_max_positions" if c.rope_max_positions is not None else "max_len"
        if _longest(sizes.values()) <= limit:
            return
        for name, n in sizes.items():
            if n > limit:
                raise ValueError(
                    f"group `{name}` has {n} tokens but {setting}={limit} (positions count within "
                    f"each group, pos_emb_type={c.pos_emb_type!r}); raise TransformerConfig.{setting}, "
                    "or split the group"
                )

    def _step(
        self,
        sizes: Mapping[str, int | None],
        positions: Tensor,
        padding: Tensor | None,
        plans: Mapping[str, Plan] | None = None,
    ) -> _Step:
        """The records every layer reads; ``plans`` replaces :attr:`plans`
        (the plans stacked once per row of a call with one dict per row)."""
        plans = self.plans if plans is None else plans
        layouts = {name: layout_of(plans[name], sizes) for name in dict.fromkeys(self.layer_patterns)}
        runs = None
        if self._banks is not None:  # the feed-forward's runs: the first plan's layout's group types
            name, first = next(iter(plans.items()))
            layout = layouts[name] if name in layouts else layout_of(first, sizes)
            runs = layout_type_runs(layout, self._banks)
        c = self.config
        freqs = None
        if c.pos_emb_type == "rope":
            freqs = rope_frequencies(positions, c.head_dim, c.rope_base)
        alibi = self.alibi if c.pos_emb_type == "alibi" else None
        if any(n is None for n in sizes.values()) and (alibi is not None or padding is not None):
            raise ValueError(
                "chunked inference of the Transformer stack supports neither ALiBi nor key padding "
                "(they read positions and masks of the cached context); run it in one shot"
            )
        return _Step(layouts, plans, runs, freqs, padding, alibi)

    def embed_inputs(self, x: Tensor, positions: Tensor) -> Tensor:
        h: Tensor = self.embed(x)
        if self.config.vocab_size is not None:
            h = h * math.sqrt(self.config.d_model)
        if self.config.pos_emb_type == "sinusoidal":
            h = h + sinusoidal(positions, self.config.d_model, h.dtype)
        return apply_dropout(h, self.config.dropout_rate, self.training)

    def head(self, h: Tensor) -> Tensor:
        h = self.final_norm(h)
        if self.config.vocab_size is None:
            return h
        assert isinstance(self.embed, nn.Embedding)
        return h @ self.embed.weight.T

    # -------------------------------------------------------------- forward

    def forward(
        self, x: Tensor, sizes: Sizes | RowSizes | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """The stack's output (logits of a token model) like ``x``'s tokens.

        ``sizes`` may be a list of dicts, one per row of ``x``, where rows
        hold different groups or sizes: ``x`` is then ``[B, N_max]`` ids or
        ``[B, N_max, d_model]`` features, each row's tokens from position 0
        and right-padded; each row runs as it would alone (its positions,
        its groups' masks), and the output is zero at the padding (see
        :mod:`patternc.nn.rows`). ``key_padding_mask`` is then ``[B, N_max]``.
        """
        if is_per_row(sizes):
            return self._run_rows(x, sizes, key_padding_mask)
        out, _ = self._run(x, sizes, key_padding_mask)  # type: ignore[arg-type]
        return out

    def _run_rows(self, x: Tensor, sizes: RowSizes, key_padding_mask: Tensor | None) -> Tensor:
        """Rows of different layouts: their real tokens end to end, run by
        the plans stacked once per row, scattered back to ``x``'s shape."""
        rows = rows_of(sizes, x.shape, x.device, in_trace())
        plans = {name: plan_for_rows(plan, rows.names) for name, plan in self.plans.items()}
        out, _ = self._run(rows.gather(x), rows.sizes, rows.gather_mask(key_padding_mask), plans)
        return rows.scatter(out)

    def _run(
        self,
        x: Tensor,
        sizes: Sizes | None,
        key_padding_mask: Tensor | None,
        plans: Mapping[str, Plan] | None = None,
    ) -> tuple[Tensor, list[KVCache | None]]:
        """The stack's output and each layer's :data:`~patternc.nn.attention.KVCache`."""
        c = self.config
        ids = c.vocab_size is not None
        traced = in_trace()  # asked once per call, handed down
        group_sizes: dict[str, int | None]
        if sizes is not None:
            group_sizes = _group_sizes(sizes, traced)
            n = sum(s or 0 for s in group_sizes.values())
            what = "sizes " + ", ".join(f"{g}={s}" for g, s in group_sizes.items())
        else:  # the token axis, also of an x without its batch dimension
            axis = 1 if x.dim() >= (2 if ids else 3) else 0
            n = x.shape[axis] if x.dim() > axis else 0
            group_sizes = dict(self._default_sizes(n))
            what = "the one group"
        if (
            x.dim() != (2 if ids else 3)
            or x.shape[1] != n
            or (x.shape[2] != c.d_model if not ids else x.is_floating_point())
        ):
            self._explain_input(x, n, what)
        if key_padding_mask is not None and (
            key_padding_mask.shape != x.shape[:2] or key_padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"key_padding_mask must be bool [batch, n_tokens] = {list(x.shape[:2])} (True: a real "
                f"token), got {key_padding_mask.dtype} {list(key_padding_mask.shape)}"
            )
        if key_padding_mask is None and ids and c.pad_token_id is not None:
            key_padding_mask = self._padding_of(x, traced)
        positions = self._positions(group_sizes, x.device, traced)
        step = self._step(group_sizes, positions, key_padding_mask, plans)
        h = self.embed_inputs(x, positions)
        caches = []
        for layer in self.layers:
            h, kv = layer(h, step)
            caches.append(kv)
        return self.head(h), caches

    def _padding_of(self, x: Tensor, traced: bool) -> Tensor | None:
        """The key padding mask of token ids ``x`` (``pad_token_id`` is
        padding), None when no token is padding. Eager, that is one host
        read of the data (``bool(...)``), which spares the padded executors
        a mask of all True; a ``torch.compile`` graph cannot branch on data,
        so traced it is always the mask (the same output)."""
        pad = self.config.pad_token_id
        assert pad is not None  # the caller checks
        real = x.ne(pad)
        if traced:
            return real
        return None if bool(real.all()) else real

    def _explain_input(self, x: Tensor, n: int, what: str) -> None:
        """Raise a ValueError that names the expected shape of ``x``."""
        c = self.config
        if c.vocab_size is not None:
            if x.is_floating_point():
                raise ValueError(
                    f"x has shape {tuple(x.shape)} ({x.dtype}) but this Transformer embeds token ids "
                    f"(vocab_size={c.vocab_size}): pass integer ids [batch, {n}], or build it with "
                    f"vocab_size=None for features [batch, n_tokens, d_model={c.d_model}]"
                )
            if x.dim() > 2:
                raise ValueError(
                    f"x has shape {tuple(x.shape)} but token ids are [batch, n_tokens], two dimensions "
                    f"(this Transformer has vocab_size={c.vocab_size})"
                )
            check_batched(x, n, None, what)
        else:
            if x.dim() == 2 and not x.is_floating_point() and x.shape[1] == n:
                raise ValueError(
                    f"x has shape {tuple(x.shape)} ({x.dtype}), token ids, but this Transformer has "
                    f"vocab_size=None and takes features [batch, {n}, d_model={c.d_model}]; set "
                    "vocab_size to embed ids"
                )
            check_batched(x, n, c.d_model, what)
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected [batch, {n}, d_model={c.d_model}]: the last "
                "dimension must be the model width"
            )

    # ------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0) -> Tensor:
        """Continue ``prompt`` (``[B, T]`` ids; one causal group) with a KV
        cache of ``kv_cache_max_len`` positions: the prompt runs once through
        the patterns, then each new token attends to the cache (within
        ``attention_window``). ``temperature`` 0 is greedy."""
        c = self.config
        _ = self._decoder_window  # raises unless the stack can decode
        if c.vocab_size is None:
            raise ValueError("generate needs a token model (vocab_size set)")
        total = prompt.shape[1] + max_new_tokens
        if total > c.cache_len:
            raise ValueError(f"{total} tokens do not fit the KV cache of kv_cache_max_len={c.cache_len}")
        logits, caches = self._run(prompt, None, None)
        (group,) = self._default_sizes(prompt.shape[1])
        # each layer's KVCache, its group's K/V grown to the cache's length
        grown: list[KVCache] = []
        for cache in caches:
            assert cache is not None  # no group came from a cache
            entry = {}
            for name, kv in cache[group].items():
                entry[name] = kv.new_zeros(kv.shape[0], kv.shape[1], c.cache_len, kv.shape[3])
                entry[name][:, :, : kv.shape[2]] = kv
            grown.append({group: entry})
        out = [prompt]
        token = _pick(logits[:, -1], temperature)
        for position in range(prompt.shape[1], total):
            out.append(token[:, None])
            if position == total - 1:
                break
            logits = self._decode_step(token, position, grown)
            token = _pick(logits, temperature)
        return torch.cat(out, dim=1)

    @functools.cached_property
    def _decoder_window(self) -> int | None:
        """The window of a one-group causal stack (None: unbounded); anything else cannot decode."""
        plans = list(self.plans.values())
        rules = [r for plan in plans for r in plan.rules]
        keys = [k for r in rules for k in r.keys]
        bands = [k.modifiers.band() for k in keys]
        # one group: `across` changes nothing; a dilated band is not a window of the cache
        causal = all(high == 0 and step == 1 for _, high, step in bands)
        if len(plans[0].groups) != 1 or not rules or not causal:
            raise ValueError(
                "generate needs a causal stack over one group (causal=True, attention_window, or a "
                "pattern such as `doc* -> self [causal]` or `[causal, back 255]`), with no `dilate`"
            )
        windows = {None if low is None else 1 - low for low, _, _ in bands}
        if len(windows) != 1:
            raise ValueError(f"generate needs one window for every layer, got {sorted(map(str, windows))}")
        return windows.pop()

    def _decode_step(self, token: Tensor, position: int, caches: Sequence[KVCache]) -> Tensor:
        """Logits of ``token`` (``[B]`` ids) at ``position``, each layer's
        ``caches`` entry (``[B, H_kv, kv_cache_max_len, D]``) holding the K/V
        of the positions before it; this token's K/V are written into it."""
        c = self.config
        window = self._decoder_window
        positions = torch.tensor([position], device=token.device)
        (group,) = self._default_sizes(1)
        step = self._step({group: 1}, positions, None)
        h = self.embed_inputs(token[:, None], positions)
        first = 0 if window is None else max(0, position - window + 1)
        bias = None
        if c.pos_emb_type == "alibi":
            keys_at = torch.arange(first, position + 1, device=token.device)
            bias = (-self.alibi[:, None, None] * (position - keys_at).to(h.dtype))[None]
        for layer, cache in zip(self.layers, caches):
            assert isinstance(layer, TransformerLayer)

            def cached_attention(
                x: Tensor, layer: TransformerLayer = layer, cache: KVCache = cache
            ) -> tuple[Tensor, KVCache | None]:
                return layer.decode(x, step, cache, position, first, bias), None

            h, _ = layer.residual(h, cached_attention, step.runs)
        return self.head(h)[:, 0]


def _pick(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]


def _longest(sizes: Iterable[int]) -> int:
    """The largest size, 0 for none: a plain loop, which ``torch.compile``
    traces on every torch version (``max`` over dict values breaks the graph
    on torch 2.11)."""
    longest = 0
    for n in sizes:
        longest = n if n > longest else longest
    return longest


def sinusoidal(positions: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[N, dim]`` fixed sinusoidal embeddings of ``positions``, as ``dtype``:
    computed in float64 for a float64 model (float32 angles would cost it
    the digits beyond float32's, and compiled kernels round them otherwise
    than eager ones), else in float32."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    steps = torch.arange(0, dim, 2, device=positions.device, dtype=work)
    inv = torch.exp(-math.log(10000.0) * steps / dim)
    angles = positions.to(work)[:, None] * inv[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(dtype)


def _group_sizes(sizes: Sizes, traced: bool) -> dict[str, int | None]:
    """Sizes as a dict of ints (0-d integer tensors read as ints); None (a
    group read from a cache) only in a chunk of :func:`patternc.nn.chunked`,
    where the context groups are cached. A list of numbers raises a
    ``TypeError`` that shows the accepted forms."""
    pairs = sizes_key(plain_sizes(sizes))
    out: dict[str, int | None] = {}
    recorder = active(traced).cache
    for name, size in pairs:
        if size is not None and (type(size) is not int or size < 0):
            raise ValueError(
                f"size of `{name}` must be an integer >= 0 (or None for a cached group), got {size!r}"
            )
        if size is None and (recorder is None or recorder.recording):
            raise ValueError(
                f"group `{name}` has size None: the stack takes every group in x (cached groups "
                "only inside patternc.nn.chunked)"
            )
        out[name] = size
    return out


def _plans(program: Program | Plan | str | None) -> dict[str, Plan]:
    if program is None:
        program = _DEFAULT_SOURCE
    if isinstance(program, str):
        program = compile_program(program)
    if isinstance(program, Plan):
        return {program.name: program}
    return dict(program.patterns)


class VisionTransformer(nn.Module):
    """Patch embedding, a ``[CLS]`` token, the stack, and a linear head.

    The groups are ``cls`` and ``patches`` (``* -> *``); ``pool`` picks the
    ``[CLS]`` output or the mean over patches.

    >>> from patternc import TransformerConfig, VisionTransformerConfig
    >>> stack = TransformerConfig(vocab_size=None, d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=64)
    >>> vit = VisionTransformer(VisionTransformerConfig(transformer=stack, image_size=16,
    ...                                                 patch_size=4, num_classes=10))
    >>> vit(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    """

    def __init__(self, config: VisionTransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.transformer.d_model
        self.patch = nn.Conv2d(config.in_channels, d, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.stack = Transformer(config.transformer, "groups cls patches\n* -> *\n")
        self.classify = nn.Linear(d, config.num_classes)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patch(images).flatten(2).transpose(1, 2)  # [B, P, d]
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), patches], dim=1)
        h = self.stack(x, {"cls": 1, "patches": patches.shape[1]})
        pooled = h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)
        return self.classify(pooled)  # type: ignore[no-any-return]
