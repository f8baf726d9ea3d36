"""``auto``'s pick on a GPU for the layouts of ``benchmarks/bench_users.py``.

The pick is a pure function of the layout and the workload (batch, heads,
head size, dtype, training, the varlen kernel), so it is pinned here on
CPU, priced as for a CUDA device: where only a mask kernel can run the
layout (modifiers that span groups of different positions: VLM, prefix-LM),
SDPA needs an ``[n, n]`` mask and loses its flash kernel, and ``flex`` must
lead; documents stay on ``varlen`` and anchor layouts on ``batched``.
"""

from __future__ import annotations

import random

import pytest
import torch

import patternc
from patternc.lower.layout import Layout
from patternc.nn.executors.auto import _estimates
from patternc.nn.executors.varlen import kept_launches

VLM = "groups registers image text\nregisters, image -> registers, image\ntext -> registers, image, text[causal]"
PREFIX = "groups prefix text\nprefix -> prefix\ntext -> prefix, text[causal]"
DOCUMENTS = "groups doc*\ndoc* -> self [causal]"
WINDOW = "groups tokens\ntokens -> tokens[causal, window 1024]"
JOINT = "groups sa sq va vq\n* -> sa, va"
FRAMES = "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"
INTERLEAVED = (
    "groups system run*{text, image}\nsystem -> system [causal]\n"
    "run*.text -> system, run*[before], self[causal]\nrun*.image -> system, run*[before], self"
)
PREFIXED_DOCUMENTS = (
    "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]"
)


def _layout(source: str, sizes: dict[str, int]) -> Layout:
    return patternc.compile(source).patterns["default"].layout(sizes)


def _vlm(scale: int) -> Layout:
    return _layout(VLM, {"registers": 16, "image": 1024 * scale, "text": 3072 * scale})


def _prefix(scale: int) -> Layout:
    return _layout(PREFIX, {"prefix": 1024 * scale, "text": 3072 * scale})


def _documents(count: int, seed: int) -> Layout:
    rng = random.Random(seed)  # bench_users' documents: 256-2048 tokens each
    return _layout(DOCUMENTS, {f"doc{i}": rng.randint(256, 2048) for i in range(count)})


def _video(frames: int, frame: int) -> Layout:
    return _layout(FRAMES, {"prompt": 256, **{f"frame{i}": frame for i in range(frames)}})


def _interleaved() -> Layout:
    runs = (("text", 512), ("image", 1024), ("text", 768), ("image", 1024), ("text", 704))
    return _layout(INTERLEAVED, {"system": 64, **{f"run{i}.{kind}": n for i, (kind, n) in enumerate(runs)}})


def _prefixed_documents(count: int, seed: int) -> Layout:
    rng = random.Random(seed)  # bench_users' texts: 256-2048 tokens, each after a 128-token prefix
    sizes: dict[str, int] = {}
    for i in range(count):
        sizes |= {f"doc{i}.prefix": 128, f"doc{i}.text": rng.randint(256, 2048)}
    return _layout(PREFIXED_DOCUMENTS, sizes)


def _ranked(
    layout: Layout, training: bool, half: bool = True, kernel: str = "flash2"
) -> list[tuple[str, float]]:
    """``auto``'s ranking as :func:`patternc.nn.executors.auto._candidates`
    prices it for a CUDA device (width 768: 12 heads of 64, batch 1);
    varlen is a candidate where its launches can express the layout (built
    on the CPU here: the device only places varlen's index tables)."""
    cpu = torch.device("cpu")
    native = half and not isinstance(kept_launches(layout, 1, cpu), str)
    found = _estimates(layout, 1, 12, 64, cpu, half, native, training, "'ieee'", kernel)
    return [(e.backend, e.seconds) for e in found]


@pytest.mark.parametrize("make", [_vlm, _prefix], ids=["vlm", "prefix"])
@pytest.mark.parametrize("scale", [1, 4, 16], ids=["4k", "16k", "64k"])
@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kernel", ["flash2", "flash4"])
def test_a_mask_only_layout_runs_on_flex(make: object, scale: int, training: bool, kernel: str) -> None:
    """VLM (16 registers + image bidirectional, text causal over all) and
    prefix-LM: varlen cannot express them, batched and dense run SDPA under
    a mask. Measured at 4k (one H100, bf16, one layer): dense 2.50 ms and
    batched 2.76 ms (fwd+bwd) against flex's 0.58-1.15 ms forward and
    1.87-2.67 ms fwd+bwd, so flex leads, forward and training, at every size."""
    assert callable(make)
    layout = make(scale)
    ranked = _ranked(layout, training, kernel=kernel)
    names = [name for name, _ in ranked]
    assert "varlen" not in names  # a modifier across groups of different positions
    assert names[0] == "flex", ranked
    seconds = dict(ranked)
    if not training and scale == 1:
        # masked SDPA over the rectangle: 4-5x flex's forward at 4k, as measured
        assert seconds["dense"] > 4 * seconds["flex"]
        assert seconds["batched"] > 4 * seconds["flex"]


@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("name", "layout", "winner"),
    [
        ("docs16", lambda: _documents(16, 1), "varlen"),
        ("docs64", lambda: _documents(64, 0), "varlen"),
        ("window", lambda: _layout(WINDOW, {"tokens": 8192}), "varlen"),
        ("joint", lambda: _layout(JOINT, {"sa": 1024, "sq": 4096, "va": 1024, "vq": 4096}), "batched"),
    ],
    ids=["docs16", "docs64", "window-1024-over-8k", "joint-2x(1k+4k)"],
)
def test_documents_windows_and_anchors_keep_their_picks(
    name: str, layout: object, winner: str, training: bool
) -> None:
    """Where varlen's launches or SDPA's views (no mask) fit, the masked
    rate changes nothing: documents and windows on varlen, AB-UPT anchors on
    batched, as ``bench_users.py`` measured them (auto at or under the
    hand-written code)."""
    assert callable(layout)
    assert _ranked(layout(), training)[0][0] == winner


@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kernel", ["flash2", "flash4"])
@pytest.mark.parametrize(
    "layout",
    [lambda: _video(16, 1024), _interleaved, lambda: _prefixed_documents(16, 2)],
    ids=["video-16x1024", "interleaved-vlm-4.1k", "prefixed-docs16-22k"],
)
def test_member_structures_run_on_flex(layout: object, kernel: str, training: bool) -> None:
    """The language's member structures, as ``bench_users.py`` lays them
    out. Block-causal video (256 prompt + 16 frames of 1024) is 17 calls of
    1024 queries each: batched launches one per frame, 96 thread blocks at
    12 heads, too few to fill the GPU, and ran 3.33 ms forward and 11.71 ms
    forward+backward on one H100 (bf16, one layer) where flex ran 2.34 and
    6.58. Interleaved VLM and prefixed documents picked flex before.

    Varlen on FlashAttention 4 (one launch, K/V gathered per frame) has no
    measurement on these rows: there the pinned part is flex ahead of
    batched."""
    assert callable(layout)
    ranked = _ranked(layout(), training, kernel=kernel)
    names = [name for name, _ in ranked]
    if kernel == "flash2":
        assert names[0] == "flex", ranked
    assert names.index("flex") < names.index("batched"), ranked


def test_a_launch_that_underfills_the_gpu_is_priced_up() -> None:
    """Batched's price for a call of few query tiles grows as its launch
    leaves SMs idle: per allowed entry, a frame of 1024 queries (96 blocks
    at 12 heads) costs more than one of 4096 (384 blocks, a full GPU)."""
    small = dict(_ranked(_video(1, 1024), False))
    large = dict(_ranked(_video(1, 4096), False))
    small_entries = _video(1, 1024).allowed_entries
    large_entries = _video(1, 4096).allowed_entries
    # per allowed entry, the underfilled launch is dearer than the full one
    assert small["batched"] / small_entries > 1.5 * large["batched"] / large_entries


def test_unmasked_sdpa_leads_full_attention_and_dense_trails() -> None:
    """One group pair with no modifiers is one SDPA call without a mask
    (batched, flash kernel); ``dense`` always passes its ``[n, n]`` mask, so
    it ranks behind both batched and flex."""
    layout = _layout("groups a b\n* -> *", {"a": 2048, "b": 2048})
    for training in (False, True):
        names = [name for name, _ in _ranked(layout, training)]
        assert names[0] == "batched"
        assert names.index("flex") < names.index("dense")


def test_float32_keeps_its_masked_rates() -> None:
    """SDPA runs its efficient kernel in float32 with or without a mask: the
    masked rate applies to half precision only, and float32 VLM still goes
    to flex (three-TF32 products) forward."""
    layout = _vlm(1)
    found = _estimates(layout, 1, 12, 64, torch.device("cpu"), False, False, False, "'tf32x3'")
    seconds = {e.backend: e.seconds for e in found}
    assert found[0].backend == "flex"
    # batched: the rectangle of both calls at one rate, the masked one at the unmasked rate
    assert seconds["batched"] < seconds["dense"]


def test_an_empty_batch_is_priced_without_error() -> None:
    """A batch of 0 rows (``x`` of shape ``[0, N, C]``) gets a price for every
    candidate: no launch's share of the GPU is zero."""
    layout = _layout("groups a q\na -> a\nq -> a", {"a": 3, "q": 4})
    cpu = torch.device("cpu")
    empty, one = (_estimates(layout, batch, 2, 8, cpu, True, False, False, "'ieee'", "flash2") for batch in (0, 1))
    assert {e.backend for e in empty} == {e.backend for e in one}
    assert all(e.seconds >= 0 for e in empty)


@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens, winner", [(8192, "varlen"), (65536, "flex"), (131072, "flex")])
def test_a_long_sliding_window_moves_from_varlen_to_flex(tokens: int, winner: str, training: bool) -> None:
    """A causal window of 1024: varlen's own sliding window runs at about
    half its unbounded rate, while flex's host work hides behind long
    kernels, so varlen wins short sequences and flex long ones (the layer
    timings are in ``docs/performance.md``)."""
    ranked = _ranked(_layout(WINDOW, {"tokens": tokens}), training)
    assert ranked[0][0] == winner, ranked


def test_flex_prices_its_host_work_as_a_floor() -> None:
    """A small flex call costs its host work however few entries it
    computes; a large one costs its kernel time, which hides that host work."""
    from patternc.lower.costs import Workload, price

    def flex_seconds(tokens: int) -> float:
        layout = _layout(WINDOW, {"tokens": tokens})
        return next(e.seconds for e in price(layout, Workload(1, 12, 64, True)) if e.backend == "flex")

    assert flex_seconds(256) == flex_seconds(512)
    assert flex_seconds(131072) > 2 * flex_seconds(65536) * 0.9
