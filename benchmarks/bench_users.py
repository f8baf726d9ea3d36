"""patternc against the attention code its users write by hand, one layer per row.

Each row is one attention layer (fused QKV projection, attention, output
projection; batch 1) on one layout, timed forward (under ``no_grad``) and
forward+backward (gradients of the input and the weights):

- ``hand flex``: FlexAttention as attention-gym teaches it: a ``mask_mod``
  written for the layout, the block mask built once with a compiled
  ``create_block_mask``, a compiled ``flex_attention`` (``dynamic=False``).
- ``hand varlen``: ``torch.nn.attention.varlen.varlen_attn`` with cumulative
  offsets, where the layout is documents (torch >= 2.10 on CUDA; skipped
  elsewhere).
- ``auto`` and ``flex``: ``patternc.nn.PatternAttention`` with that backend
  (``auto``'s pick in brackets).

Every layer gets the same weights and input; before timing, each output (and
in forward+backward each input gradient) is checked against patternc
``flex``'s (relative Frobenius error under ``--tolerance``). Times are the
median of ``--repeat`` samples, the columns of a row sampled round by round
(one sample of each per round, in a shuffled order) so drift reaches them
alike. ``auto/hand`` is ``auto`` over the faster hand-written column,
``flex/hand`` patternc ``flex`` over ``hand flex``. ``cold s`` is the first
call of the row's layout: for patternc (``flex``, then ``auto``) the whole
first call, tables and compilation included; for ``hand flex``, the
compiled ``create_block_mask`` and the first call. The first row also pays
the process's first compilation. On document rows, ``new lengths s`` is
patternc's first call (``flex``, ``auto``) after the document lengths change
(same count, same total): the tables are rebuilt, the kernel is not.

Rows (full size; ``--tiny`` shrinks every length about 16x and the layer to
width 64, 4 heads of 16, for smoke tests):

============ ==================================================
docs16     16 causal documents of 256-2048 tokens
docs64     64 causal documents of 256-2048 tokens
vlm        16 registers + 1024 image + 3072 text (text causal)
prefix     prefix-LM: 1024 prefix + 3072 text (text causal)
window     causal window 1024 over 8192 tokens
abupt      AB-UPT joint: 2 x (1024 anchors + 4096 queries)
video      256 prompt + 16 block-causal frames of 1024 (``frame*[upto]``)
interleaved  interleaved VLM: 64 system + text/image runs, 4.1k tokens
docprefix  16 documents, each a 128-token prefix + 256-2048 text
natten     NATTEN over a 128 x 128 image, kernel 13 (``image[kernel 13]``)
natten3d   NATTEN over a 16 x 32 x 32 video, kernel 3 x 7 x 7
============ ==================================================

Run: ``python benchmarks/bench_users.py [--rows vlm prefix] [--repeat 30] [--scale 4]``;
``python benchmarks/bench_users.py --device cpu --tiny`` runs everywhere
(FlexAttention eager on CPU: the numbers only show that it runs).
``--diagnose`` times, per row and forward, where patternc ``flex``'s time goes
against the hand-written kernel (see :func:`diagnose`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import patternc
from patternc.nn import PatternAttention
from patternc.nn.executors import auto as auto_module
from patternc.nn.executors import flex as flex_executor
from patternc.nn.executors.auto import choose
from patternc.nn.executors.common import AttentionInputs

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


@dataclass(frozen=True)
class Row:
    """One layout: the patternc source and sizes, the hand-written mask, and
    document lengths where the layout is documents (for ``varlen``)."""

    key: str
    title: str
    source: str
    sizes: dict[str, int]
    mask: Callable[[torch.device, int], MaskMod]
    """The hand-written ``mask_mod`` for (device, padded length)."""
    documents: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return sum(self.sizes.values())


def _document_lengths(count: int, seed: int, scale: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(max(2, rng.randint(256, 2048) // scale) for _ in range(count))


def _documents_mask(lengths: tuple[int, ...]) -> Callable[[torch.device, int], MaskMod]:
    """attention-gym's document mask: a token -> document table, causal
    within (tokens past the documents, up to ``length``: one more document)."""

    def make(device: torch.device, length: int) -> MaskMod:
        sizes = torch.tensor([*lengths, length - sum(lengths)], device=device)
        document_id = torch.repeat_interleave(torch.arange(len(lengths) + 1, device=device), sizes)

        def causal_documents(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (document_id[q_idx] == document_id[kv_idx]) & (q_idx >= kv_idx)

        return causal_documents

    return make


def _prefix_mask(prefix: int) -> Callable[[torch.device, int], MaskMod]:
    """Bidirectional over the first ``prefix`` tokens, causal after them."""

    def make(device: torch.device, length: int) -> MaskMod:
        def prefix_lm(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < prefix) | (kv_idx <= q_idx)

        return prefix_lm

    return make


def _window_mask(window: int) -> Callable[[torch.device, int], MaskMod]:
    def make(device: torch.device, length: int) -> MaskMod:
        def causal_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        return causal_window

    return make


def _anchors_mask(anchors: int, queries: int) -> Callable[[torch.device, int], MaskMod]:
    """Every token reads both branches' anchors (tokens: anchors, queries,
    anchors, queries)."""
    second = anchors + queries

    def make(device: torch.device, length: int) -> MaskMod:
        def joint(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < anchors) | ((kv_idx >= second) & (kv_idx < second + anchors))

        return joint

    return make


def _frames_mask(prompt: int, frame: int) -> Callable[[torch.device, int], MaskMod]:
    """Block-causal video as users write it: a frame-id table (the prompt is
    frame -1, causal inside itself); a frame reads the prompt and frames up
    to its own."""

    def make(device: torch.device, length: int) -> MaskMod:
        frame_id = ((torch.arange(length, device=device) - prompt) // frame).clamp_min(-1)

        def block_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            q_frame, kv_frame = frame_id[q_idx], frame_id[kv_idx]
            prompt_pair = (q_frame < 0) & (kv_idx <= q_idx)
            return prompt_pair | ((q_frame >= 0) & (kv_frame <= q_frame))

        return block_causal

    return make


def _interleaved_mask(
    runs: tuple[tuple[str, int], ...], system: int
) -> Callable[[torch.device, int], MaskMod]:
    """The interleaved-VLM mask of Hugging Face's multimodal models: causal
    over the sequence, bidirectional inside each image run (a run-id table)."""

    def make(device: torch.device, length: int) -> MaskMod:
        image_run = torch.full((length,), -1, dtype=torch.long, device=device)
        start = system
        for index, (kind, n) in enumerate(runs):
            if kind == "image":
                image_run[start : start + n] = index
            start += n

        def interleaved(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            same_image = (image_run[q_idx] >= 0) & (image_run[q_idx] == image_run[kv_idx])
            return (kv_idx <= q_idx) | same_image

        return interleaved

    return make


def _prefixed_documents_mask(prefix: int, texts: tuple[int, ...]) -> Callable[[torch.device, int], MaskMod]:
    """Packed documents of a prefix and a text each: a document-id table and
    each token's document start; a token reads its document's prefix and,
    causally, the rest of it."""

    def make(device: torch.device, length: int) -> MaskMod:
        lengths = torch.tensor([prefix + n for n in texts] + [length - sum(texts) - prefix * len(texts)])
        document_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).to(device)

        def prefixed_documents(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            same = document_id[q_idx] == document_id[kv_idx]
            in_prefix = kv_idx - starts[document_id[kv_idx]] < prefix
            return same & (in_prefix | (kv_idx <= q_idx))

        return prefixed_documents

    return make


def _natten_mask(shape: tuple[int, ...], kernel: tuple[int, ...]) -> Callable[[torch.device, int], MaskMod]:
    """Neighbourhood attention as attention-gym's ``generate_natten`` writes
    it, on any number of axes: coordinates by div/mod of the token index,
    the window's centre clamped ``K // 2`` from the edges (keys past the
    image are padding)."""
    n = math.prod(shape)
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]

    def make(device: torch.device, length: int) -> MaskMod:
        def natten(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            ok = kv_idx < n
            for size, k, stride in zip(shape, kernel, strides):
                q_at, kv_at = q_idx // stride % size, kv_idx // stride % size
                centre = q_at.clamp(k // 2, size - 1 - k // 2)
                ok = ok & (centre - k // 2 <= kv_at) & (kv_at <= centre + k // 2)
            return ok

        return natten

    return make


DOCUMENTS = "groups doc*\ndoc* -> self [causal]"
FRAMES = "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"
INTERLEAVED = (
    "groups system run*{text, image}\nsystem -> system [causal]\n"
    "run*.text -> system, run*[before], self[causal]\nrun*.image -> system, run*[before], self"
)
PREFIXED_DOCUMENTS = (
    "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]"
)
VLM = "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]"
PREFIX = "groups prefix text\nprefix -> prefix\ntext -> prefix, text[causal]"
WINDOW = "groups tokens\ntokens -> tokens[causal, window {window}]"
JOINT = (
    "groups surface_anchors surface_queries volume_anchors volume_queries\n"
    "* -> surface_anchors, volume_anchors"
)


def rows(tiny: bool, scale: int = 1) -> dict[str, Row]:
    """The layouts, at full size or about 16x shorter (``tiny``); ``scale``
    multiplies the lengths of the single-sequence rows (``vlm``, ``prefix``,
    ``window``, ``interleaved``: 4 gives about 16k tokens, 16 about 64k) and
    the number of frames (``video``) and of documents (``docprefix``), whose
    rows start at about 16k tokens (4 gives about 64k)."""
    s = 16 if tiny else 1
    out = []
    for key, count, seed in (("docs16", 16, 1), ("docs64", 64, 0)):
        lengths = _document_lengths(count, seed, s)
        sizes = {f"doc{i}": n for i, n in enumerate(lengths)}
        title = f"{count} causal documents ({sum(lengths) / 1000:.1f}k)"
        out.append(Row(key, title, DOCUMENTS, sizes, _documents_mask(lengths), lengths))
    registers, image, text = 16 // s or 1, 1024 * scale // s, 3072 * scale // s
    out.append(
        Row(
            "vlm",
            f"VLM {registers} registers + {image} image + {text} text",
            VLM,
            {"registers": registers, "image": image, "text": text},
            _prefix_mask(registers + image),
        )
    )
    out.append(
        Row(
            "prefix",
            f"prefix-LM {1024 * scale // s} + {text}",
            PREFIX,
            {"prefix": 1024 * scale // s, "text": text},
            _prefix_mask(1024 * scale // s),
        )
    )
    window, n = 1024 // s, 8192 * scale // s
    out.append(
        Row(
            "window",
            f"causal window {window} over {n}",
            WINDOW.format(window=window),
            {"tokens": n},
            _window_mask(window),
        )
    )
    anchors, queries = 1024 // s, 4096 // s
    sizes = {
        "surface_anchors": anchors,
        "surface_queries": queries,
        "volume_anchors": anchors,
        "volume_queries": queries,
    }
    out.append(
        Row("abupt", f"AB-UPT joint 2x({anchors}+{queries})", JOINT, sizes, _anchors_mask(anchors, queries))
    )
    prompt, frame, frames = 256 // s, 1024 // s, 16 * scale
    sizes = {"prompt": prompt, **{f"frame{i}": frame for i in range(frames)}}
    title = f"video: {prompt} prompt + {frames} block-causal frames of {frame}"
    out.append(Row("video", title, FRAMES, sizes, _frames_mask(prompt, frame)))
    system = 64 // s
    runs = tuple((kind, n * scale // s) for kind, n in (("text", 512), ("image", 1024), ("text", 768),
                                                         ("image", 1024), ("text", 704)))  # fmt: skip
    sizes = {"system": system, **{f"run{i}.{kind}": n for i, (kind, n) in enumerate(runs)}}
    title = f"interleaved VLM: {system} system + 3 text and 2 image runs ({sum(sizes.values()) / 1000:.1f}k)"
    out.append(Row("interleaved", title, INTERLEAVED, sizes, _interleaved_mask(runs, system)))
    prefix, texts = 128 // s, _document_lengths(16 * scale, 2, s)
    sizes = {}
    for i, n in enumerate(texts):
        sizes |= {f"doc{i}.prefix": prefix, f"doc{i}.text": n}
    title = f"{len(texts)} documents of a {prefix}-token prefix + text ({sum(sizes.values()) / 1000:.1f}k)"
    out.append(Row("docprefix", title, PREFIXED_DOCUMENTS, sizes, _prefixed_documents_mask(prefix, texts)))
    for key, shape, kernel in (
        ("natten", (32, 32) if tiny else (128, 128), (7, 7) if tiny else (13, 13)),
        ("natten3d", (4, 8, 8) if tiny else (16, 32, 32), (3, 3, 3) if tiny else (3, 7, 7)),
    ):
        source = f"groups image{list(shape)}\nimage -> image[kernel {' '.join(map(str, kernel))}]"
        title = f"NATTEN over {' x '.join(map(str, shape))}, kernel {' x '.join(map(str, kernel))}"
        out.append(Row(key, title, source, {"image": math.prod(shape)}, _natten_mask(shape, kernel)))
    return {row.key: row for row in out}


# ---------------------------------------------------------------- hand-written layers


class HandFlexAttention(nn.Module):
    """What a user writes with FlexAttention: heads first, one compiled
    ``flex_attention`` call with the block mask built once for the layout."""

    def __init__(self, width: int, heads: int, block_mask: object, attend: Callable[..., Tensor]) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.block_mask = block_mask
        self.attend = attend

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, block_mask=self.block_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))  # type: ignore[no-any-return]


class HandVarlenAttention(nn.Module):
    """What a user writes with ``varlen_attn``: packed ``[tokens, heads, dim]``
    and cumulative document offsets, causal within each document."""

    def __init__(self, width: int, heads: int, lengths: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        from torch.nn.attention.varlen import varlen_attn

        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.max_len = max(lengths)
        # torch 2.10 takes is_causal; later releases a window, (-1, 0) being causal
        causal = "is_causal" in inspect.signature(varlen_attn).parameters
        self.causal: dict[str, object] = {"is_causal": True} if causal else {"window_size": (-1, 0)}
        self.varlen_attn = varlen_attn

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b * n, 3, self.heads, self.head_dim).unbind(1)
        cu, m = self.cu_seqlens, self.max_len
        out = self.varlen_attn(q, k, v, cu, cu, m, m, **self.causal)
        return self.proj(out.reshape(b, n, width))  # type: ignore[no-any-return]


def hand_block_mask(row: Row, device: torch.device, compiled: bool) -> object:
    """attention-gym's block mask: ``create_block_mask`` over the mask_mod,
    compiled (``_compile=True``) where the run compiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = row.n_tokens
    return create_block_mask(row.mask(device, n), None, None, n, n, device=device, _compile=compiled)


def _copy_weights(target: nn.Module, source: PatternAttention) -> None:
    with torch.no_grad():
        target.qkv.weight.copy_(source.qkv.weight)  # type: ignore[operator,union-attr]
        target.qkv.bias.copy_(source.qkv.bias)  # type: ignore[operator,union-attr]
        target.proj.weight.copy_(source.proj.weight)  # type: ignore[operator,union-attr]
        target.proj.bias.copy_(source.proj.bias)  # type: ignore[operator,union-attr]


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeat: int, device: torch.device, warmup: int = 3
) -> dict[str, float]:
    """Median ms of each function, sampled round by round in a shuffled order."""
    for fn in fns.values():
        for _ in range(min(warmup, repeat)):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            samples[name].append(_sample_ms(fns[name], device))
    return {name: statistics.median(values) for name, values in samples.items()}


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def rel_error(out: Tensor, ref: Tensor) -> float:
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- the table


@dataclass
class Measured:
    """One row and pass: median ms per column, ``auto``'s pick, errors."""

    ms: dict[str, float] = dataclasses.field(default_factory=dict)
    pick: str = ""
    errors: dict[str, float] = dataclasses.field(default_factory=dict)


COLUMNS = ("hand flex", "hand varlen", "auto", "flex")


def _layer_call(
    layer: nn.Module, x: Tensor, sizes: dict[str, int] | None, backward: bool
) -> Callable[[], Tensor]:
    def run() -> Tensor:
        out = layer(x) if sizes is None else layer(x, sizes)[0]
        if backward:
            out.backward(torch.ones_like(out))
        return out  # type: ignore[no-any-return]

    if backward:
        return run

    def forward() -> Tensor:
        with torch.no_grad():
            return run()

    return forward


def measure_row(
    row: Row, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Measured], dict[str, float]]:
    """Both passes of one row, and the cold starts (seconds)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    width, heads = args.width, args.heads
    plan = patternc.compile(row.source).patterns["default"]
    config = patternc.MixedAttentionConfig(hidden_dim=width, num_heads=heads)
    torch.manual_seed(0)
    reference = PatternAttention(config, plan, backend="flex").to(device, dtype)
    layers: dict[str, nn.Module] = {"flex": reference}
    auto = PatternAttention(config, plan, backend="auto").to(device, dtype)
    auto.load_state_dict(reference.state_dict())
    layers["auto"] = auto
    x = torch.randn(1, row.n_tokens, width, device=device, dtype=dtype)
    cold: dict[str, float] = {}

    # patternc first, each its layout's first call (tables, then compilation)
    with _quiet():
        for name in ("flex", "auto"):
            cold[name] = _seconds(_layer_call(layers[name], x, row.sizes, False), device)
    start = time.perf_counter()
    block_mask = hand_block_mask(row, device, args.compile and args.hand_mask == "compiled")
    attend = flex_attention_fn(args.compile)
    hand = HandFlexAttention(width, heads, block_mask, attend).to(device, dtype)
    _copy_weights(hand, reference)
    _layer_call(hand, x, None, False)()
    _sync(device)
    cold["hand flex"] = time.perf_counter() - start
    layers["hand flex"] = hand
    if row.documents and _has_varlen(device):
        varlen = HandVarlenAttention(width, heads, row.documents, device).to(device, dtype)
        _copy_weights(varlen, reference)
        layers["hand varlen"] = varlen
    if row.documents:  # a new set of lengths: same count and total, other order
        lengths = list(row.documents)
        random.Random(1).shuffle(lengths)
        moved = {f"doc{i}": n for i, n in enumerate(lengths)}
        with _quiet():
            for name in ("flex", "auto"):
                cold[f"{name} new lengths"] = _seconds(_layer_call(layers[name], x, moved, False), device)

    results: dict[str, Measured] = {}
    for backward in (False, True):
        measured = Measured()
        calls: dict[str, Callable[[], Tensor]] = {}
        xs: dict[str, Tensor] = {}
        for name, layer in layers.items():
            if backward and name == "hand flex" and device.type == "cpu":
                continue  # torch's FlexAttention has no CPU backward (patternc's flex runs batched there)
            xs[name] = x.detach().clone().requires_grad_(backward)
            sizes = None if name.startswith("hand") else row.sizes
            calls[name] = _layer_call(layer, xs[name], sizes, backward)
        # outputs (and input gradients) against patternc flex's, before timing
        with _quiet(), _recording_picks() as picks:
            outputs = {name: call() for name, call in calls.items()}
        measured.pick = "/".join(sorted(set(picks)))
        for name, out in outputs.items():
            measured.errors[name] = rel_error(out, outputs["flex"])
            if backward:
                grad, ref_grad = xs[name].grad, xs["flex"].grad
                assert grad is not None and ref_grad is not None
                measured.errors[name] = max(measured.errors[name], rel_error(grad, ref_grad))
            if measured.errors[name] > args.tolerance:
                raise AssertionError(
                    f"{row.title}: {name} differs from patternc flex by {measured.errors[name]:.2e} "
                    f"(> {args.tolerance:g}) in {'fwd+bwd' if backward else 'fwd'}"
                )
        with _quiet():
            measured.ms = interleaved_ms(calls, args.repeat, device)
        results["fwd+bwd" if backward else "fwd"] = measured
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)
    return results, cold


@contextlib.contextmanager
def _recording_picks() -> Iterator[list[str]]:
    """What ``auto`` picks for the calls made inside (its ``choose``, wrapped)."""
    picks: list[str] = []

    def recorded(inputs: AttentionInputs) -> str:
        pick = choose(inputs)
        picks.append(pick)
        return pick

    auto_module.choose = recorded
    try:
        yield picks
    finally:
        auto_module.choose = choose


def flex_attention_fn(compiled: bool) -> Callable[..., Tensor]:
    """``flex_attention``, compiled as attention-gym compiles it."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention  # type: ignore[return-value]
    return torch.compile(flex_attention, dynamic=False)  # type: ignore[return-value]


def warm_up_process(device: torch.device, compiled: bool) -> float:
    """Seconds of one compiled FlexAttention call on a small unrelated mask
    (256 tokens, causal), before any row: the process's one-time start of
    Dynamo, Inductor and Triton, which any code compiling FlexAttention pays
    once. Without it the first row's cold start would carry it for whichever
    variant runs first (patternc's)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    start = time.perf_counter()
    with _quiet():
        q = torch.randn(1, 2, 256, 64, device=device)
        mask = create_block_mask(causal, None, None, 256, 256, device=device.type, _compile=compiled)
        fn = torch.compile(flex_attention_fn(False), dynamic=False) if compiled else flex_attention_fn(False)
        fn(q, q, q, block_mask=mask)
        _sync(device)
    return time.perf_counter() - start


def _has_varlen(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_table(
    results: dict[str, tuple[dict[str, Measured], dict[str, float]]],
    all_rows: dict[str, Row],
    cold: bool = True,
) -> None:
    """The timing table, then (``cold``) the cold starts and the largest error."""
    print()
    print(
        "| layout | pass | hand flex | hand varlen | patternc auto | patternc flex | auto / best hand | flex / hand flex |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, (passes, _) in results.items():
        title = all_rows[key].title
        for name, m in passes.items():
            hand = [m.ms[c] for c in ("hand flex", "hand varlen") if c in m.ms]
            best = min(hand, default=math.nan)
            cells = [
                _fmt(m.ms.get("hand flex")),
                _fmt(m.ms.get("hand varlen")),
                f"{_fmt(m.ms['auto'])} ({m.pick})",
                _fmt(m.ms["flex"]),
                _fmt(m.ms["auto"] / best, 2),
                _fmt(m.ms["flex"] / m.ms.get("hand flex", math.nan), 2),
            ]
            print(f"| {title if name == 'fwd' else ''} | {name} | " + " | ".join(cells) + " |")
    if not cold:
        return
    print()
    print("Cold start (s): the first call of each layout")
    print()
    print(
        "| layout | patternc flex | patternc auto | hand flex (block mask + first call) | new lengths: flex / auto |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, (_, cold) in results.items():
        moved = (
            f"{_fmt(cold['flex new lengths'], 2)} / {_fmt(cold['auto new lengths'], 2)}"
            if "flex new lengths" in cold
            else ""
        )
        print(
            f"| {all_rows[key].title} | {_fmt(cold['flex'], 2)} | {_fmt(cold['auto'], 2)} | "
            f"{_fmt(cold['hand flex'], 2)} | {moved} |"
        )
    print()
    worst = max(
        (max(m.errors.values()) for passes, _ in results.values() for m in passes.values()), default=0.0
    )
    print(f"largest relative error against patternc flex (outputs, input gradients): {worst:.2e}")


# ---------------------------------------------------------------- where flex's time goes


def diagnose(row: Row, args: argparse.Namespace, device: torch.device) -> None:
    """Forward, ready Q/K/V (no projections): the hand-written kernel against
    patternc's ``flex`` piece by piece, rows interleaved. Variants:

    - ``hand``: compiled ``flex_attention`` on contiguous heads-first Q/K/V
      and the hand block mask (torch's kernel options);
    - ``hand +opts``: the same with patternc's ``kernel_options``;
    - ``pc mask``: patternc's block mask (its table ``mask_mod``) on Q/K/V
      padded to its bucketed length, torch's options;
    - ``pc mask +opts``: the same with patternc's options (the executor's
      kernel without its guard);
    - ``pc blocks, hand mask_mod``: patternc's blocks with the hand-written
      ``mask_mod`` in place of the table lookups, patternc's options;
    - ``run_flex``: the executor on token-major Q/K/V views of one fused
      tensor, as the layer hands them over; ``run_flex unguarded``: its
      compiled graph without the non-finite guard.

    - ``hand layer``, ``patternc flex layer``, ``patternc auto layer``: the
      whole layer (projections included) of each.

    Then, for ``hand``, ``run_flex`` and the three layers, the GPU time of
    each kernel a call launches, and the CPU time the call takes to return
    (it returns before its kernels end, so where that CPU time is the longer
    of the two, it sets the layer's time); and for the hand-written and the
    patternc flex layer, the functions that take that CPU time (cProfile)."""
    from patternc.nn.executors import flexkernels
    from patternc.nn.executors.flex import (
        _attend_fn,
        _block_mask,
        _guard,
        _pad_tokens,
        _tables_key,
        flex_tables,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, dim = args.heads, args.width // args.heads
    plan = patternc.compile(row.source).patterns["default"]
    layout = plan.layout(row.sizes)
    n = layout.n_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    fused = torch.randn(1, n, 3, heads, dim, device=device, dtype=dtype, generator=gen)
    q, k, v = fused.unbind(2)  # token-major views, as the layer's split_heads gives
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    attend = flex_attention_fn(args.compile)
    hand_mask = hand_block_mask(row, device, args.compile)
    tables = flex_tables(layout, {}, device)
    key = _tables_key({}, device, 128, False, False)[1:]
    pc_mask = _block_mask(layout, tables, None, key, device)
    options = flexkernels.kernel_options(q)
    padded = [_pad_tokens(t, tables.q_len).transpose(1, 2) for t in (q, k, v)]
    hand_fn = row.mask(device, tables.q_len)
    swapped = _with_mask_mod(pc_mask, hand_fn)
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    unguarded = _attend_fn("none", False)
    config = patternc.MixedAttentionConfig(hidden_dim=args.width, num_heads=heads)
    layer = PatternAttention(config, plan, backend="flex").to(device, dtype)
    auto_layer = PatternAttention(config, plan, backend="auto").to(device, dtype)
    auto_layer.load_state_dict(layer.state_dict())
    hand_layer = HandFlexAttention(args.width, heads, hand_mask, attend).to(device, dtype)
    _copy_weights(hand_layer, layer)
    x = torch.randn(1, n, args.width, device=device, dtype=dtype, generator=gen)
    variants: dict[str, Callable[[], object]] = {
        "hand": lambda: attend(qh, kh, vh, block_mask=hand_mask),
        "hand +opts": lambda: attend(qh, kh, vh, block_mask=hand_mask, kernel_options=options),
        "pc mask": lambda: attend(*padded, block_mask=pc_mask),
        "pc mask +opts": lambda: attend(*padded, block_mask=pc_mask, kernel_options=options),
        "pc blocks, hand mask_mod": lambda: attend(*padded, block_mask=swapped, kernel_options=options),
        "run_flex": lambda: flex_executor.run_flex(inputs),
        "run_flex unguarded": lambda: unguarded(
            *(_pad_tokens(t, tables.q_len) for t in (q, k, v)), pc_mask, None, None, options
        ),
        "hand layer": lambda: hand_layer(x),
        "patternc flex layer": lambda: layer(x, row.sizes)[0],
        "patternc auto layer": lambda: auto_layer(x, row.sizes)[0],
    }
    print(f"\n== {row.title}: {n} tokens, padded to {tables.q_len}; patternc options {options}")
    for label, mask in (("hand", hand_mask), ("patternc", pc_mask)):
        partial = int(mask.kv_num_blocks.sum())
        full = int(mask.full_kv_num_blocks.sum()) if mask.full_kv_num_blocks is not None else 0
        print(f"   {label} block mask: {partial} partial, {full} full blocks, block {mask.BLOCK_SIZE}")
    print(f"   guard: {_guard(layout, tables, key, False, device, flexkernels.flash_backend(inputs))}")
    ref = variants["hand"]()
    assert isinstance(ref, Tensor)
    done: dict[str, Callable[[], object]] = {}
    for label, fn in variants.items():
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn()
            _sync(device)
        except Exception as error:  # report and go on: one table per run
            print(f"   {label}: failed: {type(error).__name__}: {error}"[:300])
            continue
        assert isinstance(out, Tensor)
        if label.endswith("layer"):
            with torch.no_grad():
                err = rel_error(out, hand_layer(x)) if label != "hand layer" else 0.0
        else:
            heads_first = out if out.shape[1] == heads else out.transpose(1, 2)
            err = rel_error(heads_first[:, :, :n], ref)
        print(
            f"   {label}: first call {time.perf_counter() - start:.1f} s, error against hand {err:.1e}",
            flush=True,
        )
        done[label] = fn
    with torch.no_grad():
        times = interleaved_ms(done, args.repeat, device)
    for label, ms in times.items():
        print(f"   {label:<28} {ms:8.3f} ms")
    with torch.no_grad():
        for label in ("hand", "run_flex", "hand layer", "patternc flex layer", "patternc auto layer"):
            if label in done:
                _host_and_kernels(label, done[label], device)
    with torch.no_grad():
        for label in ("hand layer", "patternc flex layer"):
            if label in done:
                _host_profile(label, done[label], device)
    from torch._dynamo.utils import counters

    print(
        f"   dynamo: {dict(counters['stats'])}, graph breaks {sum(counters['graph_break'].values())}, recompiles {dict(counters['recompiles']) if 'recompiles' in counters else '-'}"
    )


def _host_profile(label: str, fn: Callable[[], object], device: torch.device, calls: int = 200) -> None:
    """Where a call's host time goes: the functions (Python and the C
    functions it calls) with the most time of their own, from cProfile over
    ``calls`` calls queued back to back; a layer bound by host time is
    made faster here, not on the GPU."""
    import cProfile
    import pstats

    _sync(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    per_call = (time.perf_counter() - start) / calls * 1e6
    _sync(device)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # (file, line, name) -> (cc, nc, tt, ct, callers)
    own = sorted(((entry[2], where) for where, entry in stats.items()), reverse=True)[:15]
    print(f"   {label}: {per_call:.0f} us per call under cProfile; most time of their own (us per call):")
    for seconds, (path, line, name) in own:
        place = f"{path.rsplit('/', 2)[-1]}:{line}({name})" if path != "~" else name
        print(f"      {seconds / calls * 1e6:8.1f}  {place[-100:]}")


def _with_mask_mod(mask: BlockMask, mask_mod: MaskMod) -> BlockMask:
    """``mask``'s blocks with another ``mask_mod``."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask(
        seq_lengths=mask.seq_lengths,
        kv_num_blocks=mask.kv_num_blocks,
        kv_indices=mask.kv_indices,
        full_kv_num_blocks=mask.full_kv_num_blocks,
        full_kv_indices=mask.full_kv_indices,
        q_num_blocks=mask.q_num_blocks,
        q_indices=mask.q_indices,
        full_q_num_blocks=mask.full_q_num_blocks,
        full_q_indices=mask.full_q_indices,
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=mask_mod,
    )


def _host_and_kernels(label: str, fn: Callable[[], object], device: torch.device, calls: int = 20) -> None:
    """Host time per call (the call returns before its kernels end) and the
    kernels one call launches, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    host = []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e6)
        _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    print(f"   {label}: host {statistics.median(host):.0f} us per call; kernels per call:")
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in sorted(kernels, key=lambda e: -e.device_time_total)[:8]:
        print(f"      {event.device_time_total / calls:8.1f} us  x{event.count // calls}  {event.key[:90]}")


# ---------------------------------------------------------------- main


def _header(args: argparse.Namespace, device: torch.device) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"bench_users: {card}, torch {torch.__version__}, commit {args.commit}, {args.dtype}, "
        f"width {args.width}, {args.heads} heads of {args.width // args.heads}, batch 1; "
        f"median of {args.repeat}; flex {'compiled' if args.compile else 'eager'}; "
        f"hand block mask {args.hand_mask if args.compile else 'eager'}; "
        f"patternc forward tiles {args.forward_tiles}"
    )


def _use_torch_forward_tiles() -> None:
    """The flex executor's half-precision forward with torch's own tiles
    (its backward tiles kept), for ``--forward-tiles torch``: whether the
    executor's forward tiles or something else sets a row's forward gap.
    Reaches into the executor's option tables: a benchmark's switch, not an
    API."""
    from patternc.nn.executors import flexkernels

    flexkernels._HALF_KERNEL_OPTIONS = {}
    flexkernels._HOPPER_HALF_OPTIONS = dict(flexkernels._HOPPER_BACKWARD_OPTIONS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="lengths ~16x shorter, width 64, 4 heads")
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="lengths of vlm, prefix, window, interleaved x K; frames, documents x K",
    )
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tolerance", type=float, default=None, help="largest relative error allowed")
    parser.add_argument("--commit", default="-", help="the commit measured, for the header")
    parser.add_argument("--diagnose", action="store_true", help="where flex's forward time goes (CUDA)")
    parser.add_argument("--eager", action="store_true", help="FlexAttention uncompiled (the default on CPU)")
    parser.add_argument(
        "--forward-tiles",
        choices=("patternc", "torch"),
        default="patternc",
        help="the flex executor's half-precision forward tiles: its own (default) or torch's",
    )
    parser.add_argument(
        "--hand-mask",
        choices=("compiled", "eager"),
        default="compiled",
        help="how the hand-written block mask is built (the same BlockMask either way; "
        "eager saves the compile, and the hand cold start then counts an eager build)",
    )
    args = parser.parse_args(argv)
    if args.forward_tiles == "torch":
        _use_torch_forward_tiles()
    device = torch.device(args.device)
    args.compile = device.type == "cuda" and not args.eager
    args.width, args.heads = (64, 4) if args.tiny else (768, 12)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.tolerance is None:
        args.tolerance = 2e-2 if args.dtype != "fp32" else 1e-4
    all_rows = rows(args.tiny, args.scale)
    chosen = args.rows or list(all_rows)
    unknown = [key for key in chosen if key not in all_rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(all_rows)}")
    # one process runs many layouts: Dynamo's default of 8 compiled variants
    # per function would send the later rows' hand-written flex_attention to
    # eager (a user with one layout never meets that limit)
    flex_executor._raise_recompile_limit(256)
    print(_header(args, device), flush=True)
    if args.diagnose:
        with flex_executor.compiled(args.compile):
            for key in chosen:
                diagnose(all_rows[key], args, device)
        return
    results = {}
    with flex_executor.compiled(args.compile):
        warm = warm_up_process(device, args.compile)
        print(f"process warm-up (one compiled FlexAttention call, before any row): {warm:.2f} s", flush=True)
        for key in chosen:
            start = time.perf_counter()
            try:
                results[key] = measure_row(all_rows[key], args, device)
            except Exception as error:  # report and go on: one table per run
                print(f"{all_rows[key].title}: failed: {type(error).__name__}: {error}"[:400], flush=True)
                continue
            print(f"{all_rows[key].title}: measured in {time.perf_counter() - start:.0f} s", flush=True)
            print_table({key: results[key]}, all_rows, cold=False)
    print_table(results, all_rows)


if __name__ == "__main__":
    main()
