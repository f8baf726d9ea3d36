"""Untied (per-token-type) layers: each token type has its own weights.

A group's type is its weight bank: from the plan's ``types`` (the pattern
file's ``types`` block), from a ``group_types`` map, or by default the group's
``TokenSpec.domain``. Banks are chosen by type *name*: the module is built
with the list of type names (its banks, in order), so a call in which one type
is absent gives the other types exactly the outputs they get when all are
present. Groups of one type need not be adjacent in ``x``.

Each type's weight is its own 2-D parameter (optimizers such as Muon reject
3-D ones); they are stacked only inside the ``bmm`` path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patternc.configs import (
    LinearProjectionConfig,
    UntiedLinearConfig,
    UntiedMixedAttentionConfig,
    UntiedMLPConfig,
)
from patternc.lower.cache import BoundedCache
from patternc.lower.layout import KeySpace, Layout
from patternc.members import type_stem
from patternc.nn.attention import MixedAttention, init_linear
from patternc.nn.executors.common import Executor, compact_keys
from patternc.nn.layers import activation_fn
from patternc.nn.tables import table
from patternc.plan import Plan
from patternc.schemas import TokenSpec, domain_of

__all__ = [
    "TypeRuns",
    "UntiedLinear",
    "UntiedMLP",
    "UntiedMixedAttention",
    "UntiedPath",
    "apply_per_type",
    "layout_type_runs",
    "layout_types",
    "type_runs",
]

UntiedPath = Literal["auto", "segments", "per_type", "bmm"]
"""How untied layers run:

- ``segments``: one matmul per run of same-type tokens, outputs joined once;
- ``per_type``: tokens of each type gathered, one matmul per type, scattered back;
- ``bmm``: types of equal token counts stacked into one batched matmul;
- ``auto``: ``segments`` when runs are few (at most two per type), else ``per_type``.
"""

GroupSizes = Union[Sequence[TokenSpec], Mapping[str, Union[int, None]]]


@dataclass(frozen=True)
class TypeRuns:
    """Maximal runs of same-type tokens in ``x``: ``(bank, start, stop)``."""

    runs: tuple[tuple[int, int, int], ...]
    n_tokens: int
    by_bank: dict[int, tuple[tuple[int, int], ...]] = field(init=False, compare=False, repr=False)
    """``bank -> ((start, stop), ...)`` for the banks present, in bank order
    (derived from ``runs`` when the record is made)."""

    def __post_init__(self) -> None:
        spans: dict[int, list[tuple[int, int]]] = {}
        for bank, start, stop in self.runs:
            spans.setdefault(bank, []).append((start, stop))
        object.__setattr__(self, "by_bank", {b: tuple(spans[b]) for b in sorted(spans)})

    @property
    def interleaved(self) -> bool:
        """Many runs per type (more than two on average): gather each type once."""
        return len(self.runs) > 2 * len(self.by_bank)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x``'s tokens cut into the runs (one split: slicing each run would
        cost a whole-size gradient per run in the backward pass)."""
        if len(self.runs) == 1:
            return (x,)
        return tuple(x.split_with_sizes([stop - start for _, start, stop in self.runs], 1))

    def in_key_space(self, space: KeySpace) -> TypeRuns:
        """These runs over a layout's key space only (its tokens end to end):
        the runs of K/V projected for key tokens only."""
        runs: list[tuple[int, int, int]] = []
        before = 0
        for start, stop in space.ranges:
            for bank, a, b in self.runs:
                lo, hi = max(a, start), min(b, stop)
                if lo < hi:
                    runs.append((bank, before + lo - start, before + hi - start))
            before += stop - start
        return TypeRuns(tuple(runs), before)

    def bank_tokens(self, x: Tensor) -> dict[int, Tensor]:
        """Each bank's tokens of ``x``, its runs joined in order (bank order)."""
        by_start = dict(zip((start for _, start, _ in self.runs), self.split(x)))
        out = {}
        for bank, spans in self.by_bank.items():
            parts = [by_start[start] for start, _ in spans]
            out[bank] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out

    def join(self, outputs: Mapping[int, Tensor]) -> Tensor:
        """Per-bank outputs (laid out as :meth:`bank_tokens`) back in token order."""
        pieces: dict[int, Tensor] = {}
        for bank, spans in self.by_bank.items():
            out = outputs[bank]
            parts = out.split_with_sizes([b - a for a, b in spans], 1) if len(spans) > 1 else (out,)
            pieces.update(zip((start for start, _ in spans), parts))
        ordered = [pieces[start] for start in sorted(pieces)]
        return ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=1)


def _sizes(groups: GroupSizes) -> tuple[tuple[str, int | None], ...]:
    if isinstance(groups, Mapping):
        return tuple(groups.items())
    return tuple((s.name, s.size) for s in groups)


TYPE_RUNS: BoundedCache[tuple[Hashable, ...], TypeRuns] = BoundedCache("type runs", 1024)
"""Key ``(((group, size), ...), ((group, type), ...), bank names or None)`` ->
the :class:`TypeRuns` (plain strings and integers, so ``torch.compile``
traces the lookup; an ``lru_cache`` it would trace through, with a warning)."""


def _type_runs(
    sizes: tuple[tuple[str, int | None], ...],
    group_types: tuple[tuple[str, str], ...],
    banks: tuple[str, ...] | None,
) -> TypeRuns:
    key = (sizes, group_types, banks)
    return TYPE_RUNS.get_or_build(key, lambda: _build_type_runs(sizes, group_types, banks))


def _build_type_runs(
    sizes: tuple[tuple[str, int | None], ...],
    group_types: tuple[tuple[str, str], ...],
    banks: tuple[str, ...] | None,
) -> TypeRuns:
    explicit = dict(group_types)
    runs: list[tuple[int, int, int]] = []
    start = 0
    for name, size in sizes:
        if not size:
            continue
        type_name = explicit.get(name, domain_of(name))
        if banks is None:
            raise ValueError(
                "this untied layer was built without type names, so it cannot tell which bank "
                f"group `{name}` (type `{type_name}`) uses; build it with types=[...] "
                "(e.g. program.type_names)"
            )
        if type_name not in banks:
            raise ValueError(
                f"group `{name}` has type `{type_name}`, which is not one of this layer's types "
                f"{list(banks)}; build the layer with that type or map the group to a known type"
            )
        bank = banks.index(type_name)
        if runs and runs[-1][0] == bank and runs[-1][2] == start:
            runs[-1] = (bank, runs[-1][1], start + size)
        else:
            runs.append((bank, start, start + size))
        start += size
    return TypeRuns(tuple(runs), start)


class TypeBinding:
    """Which weight bank each token type uses: the names bound so far, in bank order.

    Given ``types=[...]`` the binding is fixed. Without it (the seed's
    ``num_types`` alone) the first forward binds the types it sees in order of
    first appearance, later calls reuse that binding (a call missing a type
    shifts nothing), a new type takes the next free bank, and a type beyond
    ``num_types`` is an error naming the bound ones. The layers of a block
    share one binding; it is saved in each untied linear's ``state_dict``
    (extra state), so a reloaded model keeps it.
    """

    def __init__(self, num_types: int, names: Sequence[str] | None = None) -> None:
        self.num_types = num_types
        self.fixed = names is not None
        self.names: list[str] = list(names or [])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __repr__(self) -> str:
        return f"TypeBinding({self.names!r}, num_types={self.num_types})"

    def bind(
        self, sizes: tuple[tuple[str, int | None], ...], group_types: Mapping[str, str]
    ) -> tuple[str, ...]:
        """The bank names, after binding any type of ``sizes`` not bound yet."""
        if self.fixed:
            return tuple(self.names)
        for name, size in sizes:
            if not size:
                continue
            type_name = group_types.get(name, domain_of(name))
            if type_name in self.names:
                continue
            if len(self.names) >= self.num_types:
                raise ValueError(
                    f"group `{name}` has type `{type_name}`, but this layer's {self.num_types} weight "
                    f"bank(s) are bound to {self.names}; build it with a larger num_types, or map the "
                    "group to a bound type"
                )
            self.names.append(type_name)
        return tuple(self.names)


def type_runs(
    groups: GroupSizes,
    group_types: Mapping[str, str] | None,
    banks: TypeBinding | Sequence[str] | None,
) -> TypeRuns:
    """Runs of same-type tokens for groups in ``x`` order (cached per layout).
    ``group_types`` overrides the default type (the group's domain); a
    :class:`TypeBinding` binds the types it has not seen yet first."""
    sizes = _sizes(groups)
    explicit = group_types or {}
    names = banks.bind(sizes, explicit) if isinstance(banks, TypeBinding) else banks
    return _type_runs(sizes, tuple(sorted(explicit.items())), tuple(names) if names is not None else None)


def layout_types(layout: Layout) -> dict[str, str]:
    """``{group: type}`` of a layout's groups: the types its plan named
    (``layout.group_types``), else each group's domain (as :attr:`Plan.types`)."""
    names = [name for name, _ in layout.sizes]
    if layout.group_types:
        return dict(zip(names, layout.group_types))
    return {name: domain_of(type_stem(name)) for name in names}


def layout_type_runs(
    layout: Layout, banks: TypeBinding | Sequence[str] | None, group_types: Mapping[str, str] | None = None
) -> TypeRuns:
    """Runs of same-type tokens of ``layout``'s groups, read from the layout:
    its group types (:func:`layout_types`, kept in its tables, never
    re-bound from the plan) and the runs per bank names (kept there too).
    ``group_types`` replaces the layout's types (a layer's own mapping for
    a hand-written pattern list); a :class:`TypeBinding` binds the types it
    has not seen yet first."""
    if group_types is None:
        types: Mapping[str, str] = table(layout, ("group types",), lambda: layout_types(layout))
        explicit = None
    else:
        types, explicit = group_types, tuple(sorted(group_types.items()))
    names = banks.bind(layout.sizes, types) if isinstance(banks, TypeBinding) else banks
    bank_names = tuple(names) if names is not None else None
    return table(
        layout,
        ("type runs", bank_names, explicit),
        lambda: _build_type_runs(layout.sizes, tuple(types.items()), bank_names),
    )


def plan_group_types(patterns: object, specs: GroupSizes, fallback: Mapping[str, str]) -> Mapping[str, str]:
    """Group types from a plan bound to these groups (families expanded), else ``fallback``."""
    if isinstance(patterns, Plan):
        return patterns.bind([name for name, _ in _sizes(specs)]).types
    return fallback


def check_types(types: Sequence[str] | TypeBinding | None, num_types: int) -> TypeBinding:
    """The layer's binding: shared when ``types`` already is one (a block's
    layers), fixed from explicit names, else bound by the first forward."""
    if isinstance(types, TypeBinding):
        if types.num_types != num_types:
            raise ValueError(
                f"a binding of {types.num_types} types given to a layer of num_types={num_types}"
            )
        return types
    if types is None:
        return TypeBinding(num_types)
    names = tuple(types)
    if len(names) != num_types:
        raise ValueError(
            f"num_types is {num_types} but {len(names)} type names were given ({list(names)}); "
            "they must match (one weight bank per type)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"type names must be unique, got {list(names)}")
    return TypeBinding(num_types, names)


def apply_per_type(
    x: Tensor, runs: TypeRuns, fn: Callable[[int, Tensor], Tensor], path: UntiedPath = "auto"
) -> Tensor:
    """``fn(bank, tokens)`` on each type's tokens of ``x`` (``[B, N, ...]``),
    results joined back in token order."""
    if x.shape[1] != runs.n_tokens:
        raise ValueError(f"x has {x.shape[1]} tokens but the groups add up to {runs.n_tokens}")
    if not runs.runs:  # no tokens at all: shapes still flow through bank 0
        return fn(0, x)
    if path == "auto":
        path = "per_type" if runs.interleaved else "segments"
    if path == "segments" or len(runs.by_bank) == len(runs.runs):
        parts = [fn(bank, tokens) for (bank, _, _), tokens in zip(runs.runs, runs.split(x))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    # per_type: gather each type's runs, one call per type, put pieces back in order
    return runs.join({bank: fn(bank, tokens) for bank, tokens in runs.bank_tokens(x).items()})


class _SegmentedLinear(torch.autograd.Function):
    """``y[:, a:b] = x[:, a:b] @ W[bank].T + bias[bank]`` for each run, written
    straight into one output (and, backward, one input gradient): no gather,
    no concatenation. Weights of banks absent from the runs get no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        runs: tuple[tuple[int, int, int], ...],
        num_banks: int,
        *params: Tensor,
    ) -> Tensor:
        weights, biases = params[:num_banks], params[num_banks:]
        out = x.new_empty(*x.shape[:-1], weights[0].shape[0])
        for bank, start, stop in runs:
            for b in range(x.shape[0]):
                if biases:
                    torch.addmm(biases[bank], x[b, start:stop], weights[bank].t(), out=out[b, start:stop])
                else:
                    torch.mm(x[b, start:stop], weights[bank].t(), out=out[b, start:stop])
        ctx.save_for_backward(x, *weights)
        ctx.runs = runs
        ctx.has_bias = bool(biases)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        runs: tuple[tuple[int, int, int], ...] = ctx.runs
        grad_out = grad_out.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        present = sorted({bank for bank, _, _ in runs})
        grad_w: list[Tensor | None] = [None] * len(weights)
        grad_b: list[Tensor | None] = [None] * len(weights)
        for bank in present:
            if ctx.needs_input_grad[3 + bank]:
                grad_w[bank] = torch.zeros_like(weights[bank])
            if ctx.has_bias and ctx.needs_input_grad[3 + len(weights) + bank]:
                grad_b[bank] = weights[bank].new_zeros(weights[bank].shape[0])
        for bank, start, stop in runs:
            for b in range(x.shape[0]):
                g = grad_out[b, start:stop]
                if grad_x is not None:
                    torch.mm(g, weights[bank], out=grad_x[b, start:stop])
                gw = grad_w[bank]
                if gw is not None:
                    gw.addmm_(g.t(), x[b, start:stop])
                gb = grad_b[bank]
                if gb is not None:
                    gb.add_(g.sum(0))
        bias_grads = grad_b if ctx.has_bias else []
        return (grad_x, None, None, *grad_w, *bias_grads)


def segmented_linear(
    x: Tensor, runs: TypeRuns, weights: Sequence[Tensor], biases: Sequence[Tensor] | None
) -> Tensor:
    """Untied linear over ``x`` (``[B, N, in]``) by type runs, without copies."""
    if x.shape[1] != runs.n_tokens:
        raise ValueError(f"x has {x.shape[1]} tokens but the groups add up to {runs.n_tokens}")
    params = [*weights, *(biases or [])]
    out: Tensor = _SegmentedLinear.apply(x.contiguous(), runs.runs, len(weights), *params)  # type: ignore[no-untyped-call]
    return out


class UntiedLinear(nn.Module):
    """A linear layer with one weight bank per token type.

    >>> from patternc.configs import LinearProjectionConfig, UntiedLinearConfig
    >>> geometry = LinearProjectionConfig(input_dim=4, output_dim=6)
    >>> cfg = UntiedLinearConfig(linear_projection=geometry, num_types=2)
    >>> layer = UntiedLinear(cfg, types=["surface", "volume"])
    >>> layer(torch.randn(1, 5, 4), {"surface_anchors": 2, "volume_anchors": 3}).shape
    torch.Size([1, 5, 6])
    """

    def __init__(
        self,
        config: UntiedLinearConfig,
        types: Sequence[str] | TypeBinding | None = None,
        path: UntiedPath = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        self.types = check_types(types, config.num_types)
        self.path: UntiedPath = path
        geometry = config.linear_projection
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(geometry.output_dim, geometry.input_dim))
            for _ in range(config.num_types)
        )
        self.bias: nn.ParameterList | None = (
            nn.ParameterList(nn.Parameter(torch.empty(geometry.output_dim)) for _ in range(config.num_types))
            if geometry.bias
            else None
        )
        self.reset_parameters()

    def reset_parameters(self, *, zero: bool = False) -> None:
        geometry = self.config.linear_projection
        for bank in range(self.config.num_types):
            # initialise each bank as a tied nn.Linear would be
            template = nn.Linear(geometry.input_dim, geometry.output_dim, bias=geometry.bias)
            init_linear(template, geometry.init_weights, zero=zero)
            with torch.no_grad():
                self.weight[bank].copy_(template.weight)
                if self.bias is not None:
                    self.bias[bank].copy_(template.bias)

    def get_extra_state(self) -> dict[str, object]:
        """The type binding travels with the weights (bank ``i`` is ``types[i]``)."""
        return {"types": list(self.types.names)}

    def set_extra_state(self, state: Any) -> None:
        names = list(state.get("types", [])) if isinstance(state, dict) else []
        if self.types.fixed and names and names != self.types.names:
            raise ValueError(
                f"this checkpoint's banks are types {names}, but the layer was built with types="
                f"{self.types.names}; build it without types= (or with these) to load it"
            )
        if not self.types.fixed:
            self.types.names[:] = names

    @property
    def num_types(self) -> int:
        return self.config.num_types

    @property
    def input_dim(self) -> int:
        return self.config.linear_projection.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.linear_projection.output_dim

    @property
    def weights(self) -> nn.ParameterList:
        """The same list as :attr:`weight` (an older name, kept so code using it goes on working)."""
        return self.weight

    @property
    def biases(self) -> nn.ParameterList | None:
        """The same list as :attr:`bias` (an older name)."""
        return self.bias

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # earlier layouts: patternc's `weights.i`/`biases.i`, and the seed's one
        # stacked `weight` [num_types, out, in] and `bias` [num_types, out]
        for name, old in (("weight", "weights"), ("bias", "biases")):
            for bank in range(self.num_types):
                value = state_dict.pop(f"{prefix}{old}.{bank}", None)
                if value is not None:
                    state_dict.setdefault(f"{prefix}{name}.{bank}", value)
            stacked = state_dict.pop(prefix + name, None)
            if stacked is None:
                continue
            if stacked.dim() < 2 or stacked.shape[0] != self.num_types:
                raise ValueError(
                    f"{prefix}{name} has shape {tuple(stacked.shape)}: a stacked bank tensor needs "
                    f"num_types={self.num_types} rows first; per-bank keys are {prefix}{name}.0, ..."
                )
            for bank in range(self.num_types):
                state_dict[f"{prefix}{name}.{bank}"] = stacked[bank]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        missing: list[str] = args[2] if len(args) > 2 else kwargs.get("missing_keys", [])
        key = prefix + "_extra_state"
        if key in missing:  # a checkpoint from before bindings were saved: keep the layer's
            missing.remove(key)

    def bias_of(self, bank: int) -> Tensor | None:
        return self.bias[bank] if self.bias is not None else None

    def bank_weights(self) -> list[Tensor]:
        """The ``[output_dim, input_dim]`` matrix each bank applies (``y = x @ W.T``),
        in bank order: ``list(self.weight)``. A subclass that stores its banks
        otherwise (transposed, say) overrides this one method."""
        return list(self.weight)

    def linear(self, bank: int, x: Tensor) -> Tensor:
        return F.linear(x, self.bank_weights()[bank], self.bias_of(bank))

    def runs(self, groups: GroupSizes, group_types: Mapping[str, str] | None = None) -> TypeRuns:
        return type_runs(groups, group_types, self.types)

    def forward(
        self,
        x: Tensor,
        groups: GroupSizes | TypeRuns,
        group_types: Mapping[str, str] | None = None,
        rows: slice | None = None,
    ) -> Tensor:
        """``x``: ``[B, N, input_dim]`` holding ``groups`` (TokenSpecs or a
        ``{group: size}`` dict) in order; ``group_types`` maps groups to types
        (default: each group's domain). ``rows``: only these output features
        (views of every bank's rows: Q apart from K/V of a fused projection)."""
        runs = groups if isinstance(groups, TypeRuns) else self.runs(groups, group_types)
        biases = list(self.bias) if self.bias is not None else None
        return self.run(x, runs, self.bank_weights(), biases, rows)

    def run(
        self,
        x: Tensor,
        runs: TypeRuns,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor] | None,
        rows: slice | None = None,
    ) -> Tensor:
        """:meth:`forward` with the banks given: ``weights[i]`` (``[output_dim,
        input_dim]``, ``y = x @ W.T``) and ``biases[i]`` apply to bank ``i``'s runs
        by this layer's path. For callers that derive each call's matrices from
        the parameters (transposed, say)."""
        if rows is not None:
            weights = [w[rows] for w in weights]
            biases = None if biases is None else [b[rows] for b in biases]

        def linear(bank: int, tokens: Tensor) -> Tensor:
            return F.linear(tokens, weights[bank], None if biases is None else biases[bank])

        if self.path == "bmm":
            return self._bmm(x, runs, weights, biases, linear)
        if self.path == "per_type" or (self.path == "auto" and runs.interleaved):
            return apply_per_type(x, runs, linear, "per_type")
        if self.path == "segments" or (self.path == "auto" and x.dim() == 3):
            return segmented_linear(x, runs, weights, biases)
        return apply_per_type(x, runs, linear, self.path)

    def _bmm(
        self,
        x: Tensor,
        runs: TypeRuns,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor] | None,
        linear: Callable[[int, Tensor], Tensor],
    ) -> Tensor:
        """Equal-sized types as one batched matmul with stacked weights
        (else one ``linear(bank, tokens)`` per type)."""
        spans = runs.by_bank
        counts = {sum(b - a for a, b in s) for s in spans.values()}
        if len(counts) != 1:
            return apply_per_type(x, runs, linear, "per_type")
        by_bank = runs.bank_tokens(x)
        banks = list(by_bank)
        tokens = torch.stack([by_bank[bank] for bank in banks])  # [T, B, n, in]
        t, batch, n, _ = tokens.shape
        weight = torch.stack([weights[bank] for bank in banks]).transpose(1, 2)  # [T, in, out]
        out = torch.bmm(tokens.reshape(t, batch * n, -1), weight)
        if biases is not None:
            out = out + torch.stack([biases[bank] for bank in banks])[:, None, :]
        return runs.join(dict(zip(banks, out.reshape(t, batch, n, -1).unbind(0))))

    def extra_repr(self) -> str:
        g = self.config.linear_projection
        types = list(self.types or range(self.config.num_types))
        return f"{g.input_dim} -> {g.output_dim}, types={types}, path={self.path}"


class UntiedMLP(nn.Module):
    """``MLP`` topology with an :class:`UntiedLinear` for every layer. With few
    runs of each type every layer writes its runs into one output (no copies);
    with many interleaved runs each type's tokens are gathered once and run
    through the whole MLP."""

    def __init__(
        self,
        config: UntiedMLPConfig,
        types: Sequence[str] | TypeBinding | None = None,
        path: UntiedPath = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        self.types = check_types(types, config.num_types)
        self.path: UntiedPath = path
        mlp = config.mlp
        dims = [mlp.input_dim] + [mlp.hidden_dim] * (mlp.num_layers + 1) + [mlp.output_dim]
        self.layers = nn.ModuleList(
            UntiedLinear(
                UntiedLinearConfig(
                    linear_projection=LinearProjectionConfig(
                        input_dim=a, output_dim=b, bias=mlp.bias, init_weights=mlp.init_weights
                    ),
                    num_types=config.num_types,
                ),
                self.types,
            )
            for a, b in itertools.pairwise(dims)
        )
        if mlp.init_weights == "zero":  # as MLP: the last layer starts at zero
            last = self.layers[-1]
            assert isinstance(last, UntiedLinear)
            last.reset_parameters(zero=True)
        self.activation = activation_fn(mlp.activation)

    def _mlp(self, bank: int, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, UntiedLinear)
            x = layer.linear(bank, x)
            if i < last:
                x = self.activation(x)
        return x

    def forward(
        self, x: Tensor, groups: GroupSizes | TypeRuns, group_types: Mapping[str, str] | None = None
    ) -> Tensor:
        runs = groups if isinstance(groups, TypeRuns) else type_runs(groups, group_types, self.types)
        if self.path == "per_type" or (self.path == "auto" and runs.interleaved):
            # interleaved types: gather each type once and run its whole MLP
            return apply_per_type(x, runs, self._mlp, "per_type")
        # few runs: each layer writes its runs in place; activations run on the whole tensor
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, runs)
            if i < last:
                x = self.activation(x)
        return x


class UntiedMixedAttention(MixedAttention):
    """``MixedAttention`` with per-type QKV and output projections; attention
    itself runs across all tokens through the plan.

    Group types come from the plan (``Plan.types``) when ``attention_patterns``
    is a compiled plan, else from ``group_types``, else each group's domain.
    ``num_kv_heads`` and ``executor`` as in :class:`MixedAttention`.
    """

    def __init__(
        self,
        config: UntiedMixedAttentionConfig,
        types: Sequence[str] | TypeBinding | None = None,
        group_types: Mapping[str, str] | None = None,
        path: UntiedPath = "auto",
        *,
        num_kv_heads: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(config, num_kv_heads=num_kv_heads, executor=executor)
        projections = config.projection_config(num_kv_heads)
        self.types = check_types(types, config.num_types)
        self.group_types = dict(group_types or {})
        proj = UntiedLinear(projections.out, self.types, path)
        proj.reset_parameters(zero=config.init_weights == "zero")
        self.qkv = UntiedLinear(projections.qkv, self.types, path)  # type: ignore[assignment]
        self.proj = proj  # type: ignore[assignment]

    def reset_parameters(self) -> None:
        qkv, proj = self.qkv, self.proj
        if isinstance(qkv, UntiedLinear) and isinstance(proj, UntiedLinear):
            qkv.reset_parameters()
            proj.reset_parameters(zero=self.config.init_weights == "zero")

    def type_runs(self, specs: GroupSizes, patterns: object) -> TypeRuns:
        return type_runs(specs, plan_group_types(patterns, specs, self.group_types), self.types)

    def layout_runs(self, layout: Layout, patterns: object) -> TypeRuns:
        """The runs of ``layout``'s tokens over this layer's banks: the
        layout's group types for a plan, the layer's ``group_types`` for a
        hand-written list (kept in the layout's tables either way)."""
        group_types = None if isinstance(patterns, Plan) else self.group_types
        return layout_type_runs(layout, self.types, group_types)

    def _project_in(self, x: Tensor, layout: Layout, patterns: object) -> Tensor:
        return self.qkv(x, self.layout_runs(layout, patterns))  # type: ignore[no-any-return]

    def _project_apart(self, x: Tensor, layout: Layout, patterns: object) -> tuple[Tensor, Tensor] | None:
        """Q for every token by its type's bank, K/V for the key space's
        tokens only by theirs (rows of each bank's fused weight)."""
        runs = self.layout_runs(layout, patterns)
        qkv = self.qkv
        assert isinstance(qkv, UntiedLinear)
        rows = (self.num_heads * self.head_dim, 2 * self.kv_inner)
        # one split per bank (not a slice per call): its backward is one
        # concatenation, where two slices would each scatter into zeros
        weights = [w.split_with_sizes(rows) for w in qkv.bank_weights()]
        biases = None if qkv.bias is None else [b.split_with_sizes(rows) for b in qkv.bias]
        space = layout.key_space
        q = qkv.run(x, runs, [w[0] for w in weights], None if biases is None else [b[0] for b in biases])
        kv_weights, kv_biases = [w[1] for w in weights], None if biases is None else [b[1] for b in biases]
        kv = qkv.run(compact_keys(x, space), runs.in_key_space(space), kv_weights, kv_biases)
        return q, kv

    def _project_back(self, out: Tensor, layout: Layout, patterns: object) -> Tensor:
        return self.proj(out, self.layout_runs(layout, patterns))  # type: ignore[no-any-return]
