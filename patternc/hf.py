"""Hugging Face ``transformers``: patternc as an attention implementation.

Register once, build or load the model with ``attn_implementation="patternc"``,
and pass the plan's group sizes with each call; the model's own mask is not
built (the plan is the mask):

>>> import patternc, patternc.hf                                    # doctest: +SKIP
>>> plan = patternc.compile("groups doc*\\ndoc* -> self [causal]").patterns["default"]
>>> patternc.hf.register(plan)                                       # doctest: +SKIP
>>> model = LlamaForCausalLM._from_config(config, attn_implementation="patternc")  # doctest: +SKIP
>>> sizes = {"doc0": 300, "doc1": 212}                               # packed documents
>>> logits = model(ids, position_ids=patternc.hf.position_ids(sizes),  # doctest: +SKIP
...                patternc_sizes=sizes).logits

``patternc_plan=`` per call overrides the registered plan. Needs the
``[hf]`` extra; nothing else in patternc imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from patternc.nn.executors import AttentionInputs, get_executor
from patternc.nn.executors.common import group_positions
from patternc.nn.traced_layouts import layout_of
from patternc.plan import Plan

__all__ = ["attention_forward", "position_ids", "register"]

_DEFAULTS: dict[str, Any] = {}


def register(plan: Plan | None = None, *, name: str = "patternc", backend: str = "auto") -> str:
    """Register ``name`` with ``transformers``' ``AttentionInterface`` (and a
    mask function that builds nothing). ``plan``: the plan calls use when they
    pass no ``patternc_plan``; ``backend``: the executor. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    get_executor(backend)  # refuse an unknown backend now, not at the first forward
    _DEFAULTS[name] = {"plan": plan, "backend": backend}

    def forward(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
    ) -> Any:
        return attention_forward(module, query, key, value, attention_mask, implementation=name, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, _no_mask)
    return name


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def position_ids(sizes: Mapping[str, int], device: torch.device | str | None = None) -> Tensor:
    """``[1, N]`` positions that restart in every group: RoPE sees each packed
    document as if it ran alone."""
    return group_positions(tuple(sizes.values()), torch.device(device or "cpu"))[None]


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    implementation: str = "patternc",
    patternc_sizes: Mapping[str, int] | None = None,
    patternc_plan: Plan | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention signature: ``query`` ``[B, H, L, D]``, ``key``/
    ``value`` ``[B, H_kv, L, D]``; returns ``([B, L, H, D], None)``."""
    defaults = _DEFAULTS.get(implementation, {})
    plan = patternc_plan or defaults.get("plan")
    if plan is None or patternc_sizes is None:
        raise ValueError(
            "the patternc attention needs the plan and the group sizes of the sequence: "
            "patternc.hf.register(plan) once, then model(..., patternc_sizes={group: tokens, ...})"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{key.shape[2]} keys for {query.shape[2]} queries: the patternc attention runs whole "
            "sequences (training, prefill); decode with the model's own attention (use_cache=False here)"
        )
    layout = layout_of(plan, dict(patternc_sizes))
    if layout.n_tokens != query.shape[2]:
        raise ValueError(
            f"patternc_sizes add up to {layout.n_tokens} tokens but the sequence has {query.shape[2]}"
        )
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:  # grouped-query attention: each key/value head serves `repeat` query heads
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    drop = dropout if module.training else 0.0
    inputs = AttentionInputs(q, k, v, layout, {}, None, drop, scaling)
    out = get_executor(defaults.get("backend", "auto"))(inputs)
    return out.contiguous(), None
