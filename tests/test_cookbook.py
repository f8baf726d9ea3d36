"""The cookbook's masks (docs/cookbook.md, examples/cookbook/*.patc): each one
on every backend against the float64 reference written from the language's
definition, forward and backward, at several sizes (odd ones included)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import EXAMPLES
from reference import language_mask, reference_pattern_attention, relative_error

import patternc
from patternc.nn import PatternAttention

BACKENDS = ["batched", "loop", "dense", "flex", "varlen", "auto"]

AB_UPT = patternc.compile(EXAMPLES / "ab_upt.patc")
CASES: dict[str, tuple[patternc.Plan, list[dict[str, int]]]] = {
    "prefix_lm": (
        patternc.compile(EXAMPLES / "cookbook" / "prefix_lm.patc").patterns["default"],
        [{"prefix": 3, "text": 5}, {"prefix": 1, "text": 13}, {"prefix": 7, "text": 1}],
    ),
    "vlm": (
        patternc.compile(EXAMPLES / "cookbook" / "vlm.patc").patterns["default"],
        [{"registers": 2, "image": 9, "text": 6}, {"registers": 1, "image": 4, "text": 11}],
    ),
    "packed_causal": (
        patternc.compile(EXAMPLES / "cookbook" / "packed_causal.patc").patterns["default"],
        [{"doc0": 5, "doc1": 1, "doc2": 9}, {"doc0": 7}, {"doc0": 3, "doc1": 3}],
    ),
    "sliding_window_global": (
        patternc.compile(EXAMPLES / "cookbook" / "sliding_window_global.patc").patterns["default"],
        [{"global": 2, "tokens": 13}, {"global": 1, "tokens": 5}],
    ),
    "asymmetric_window": (
        patternc.compile(EXAMPLES / "cookbook" / "asymmetric_window.patc").patterns["default"],
        [{"tokens": 13}, {"tokens": 2}, {"tokens": 40}],
    ),
    "global_mid_sequence": (
        patternc.compile(EXAMPLES / "cookbook" / "global_mid_sequence.patc").patterns["default"],
        [
            {"before": 10, "global": 1, "after": 12},
            {"before": 1, "global": 1, "after": 3},
            {"before": 0, "global": 2, "after": 7},
        ],
    ),
    "perceiver": (
        patternc.compile(EXAMPLES / "cookbook" / "perceiver.patc").patterns["default"],
        [{"latents": 4, "inputs": 11}, {"latents": 1, "inputs": 6}],
    ),
    "video_frames": (
        patternc.compile(EXAMPLES / "cookbook" / "video_frames.patc").patterns["default"],
        [{"prompt": 3, "frame0": 5, "frame1": 5, "frame2": 5}, {"prompt": 1, "frame0": 7}],
    ),
    "block_diffusion": (
        patternc.compile(EXAMPLES / "cookbook" / "block_diffusion.patc").patterns["default"],
        [{"noisy0": 4, "noisy1": 3, "clean0": 4, "clean1": 3}],
    ),
    "interleaved_vlm": (
        patternc.compile(EXAMPLES / "cookbook" / "interleaved_vlm.patc").patterns["default"],
        [
            {"system": 2, "run0.image": 5, "run1.text": 3, "run2.image": 4, "run3.text": 6},
            {"system": 1, "run0.text": 9},
        ],
    ),
    "prefix_per_document": (
        patternc.compile(EXAMPLES / "cookbook" / "prefix_per_document.patc").patterns["default"],
        [{"doc0.prefix": 3, "doc0.text": 5, "doc1.prefix": 2, "doc1.text": 7}, {"doc0.text": 6}],
    ),
    "shared_question": (
        patternc.compile(EXAMPLES / "cookbook" / "shared_question.patc").patterns["default"],
        [{"qa0.question": 4, "qa0.answer0": 3, "qa0.answer1": 5, "qa1.question": 3, "qa1.answer0": 2}],
    ),
    "sliding_tiles": (
        patternc.compile(EXAMPLES / "cookbook" / "sliding_tiles.patc").patterns["default"],
        [
            {**{f"tile{r}_{c}": 3 for r in range(4) for c in range(3)}, "caption": 5},
            {**{f"tile{r}_{c}": 1 for r in range(2) for c in range(2)}, "caption": 1},
        ],
    ),
    "natten": (
        patternc.compile(EXAMPLES / "cookbook" / "natten.patc").patterns["default"],
        [{"image": 48, "caption": 5}, {"image": 48, "caption": 1}],
    ),
    "perceiver_read_only": (
        patternc.compile(EXAMPLES / "cookbook" / "perceiver_read_only.patc").patterns["default"],
        [{"latents": 4, "inputs": 11}, {"latents": 1, "inputs": 6}],
    ),
    **{
        f"ab_upt_{name}": (
            AB_UPT.patterns[name],
            [
                {"surface_anchors": 3, "surface_queries": 5, "volume_anchors": 3, "volume_queries": 5},
                {"surface_anchors": 2, "surface_queries": 7, "volume_anchors": 4, "volume_queries": 1},
            ],
        )
        for name in ("self_anchor", "cross_anchor", "joint")
    },
}


def make(plan: patternc.Plan, backend: str, dim: int = 16) -> PatternAttention:
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=dim, num_heads=2, implementation=backend)
    module = PatternAttention(config, plan)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cookbook_mask_forward_and_backward(case: str, backend: str) -> None:
    plan, size_list = CASES[case]
    module = make(plan, backend)
    for sizes in size_list:
        n = sum(sizes.values())
        x = torch.randn(2, n, 16, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # varlen on CPU says it runs as batched
            out, _ = module(x, sizes)
        x64 = x.detach().double().requires_grad_(True)
        ref = reference_pattern_attention(module, x64, plan, sizes)
        assert relative_error(out, ref) < 1e-5, (case, backend, sizes)
        grad = torch.randn_like(ref)
        out.backward(grad.float())
        ref.backward(grad)
        assert x.grad is not None and x64.grad is not None
        assert relative_error(x.grad, x64.grad) < 1e-4, (case, backend, sizes)


def test_vlm_text_sees_every_image_token() -> None:
    """The mask the issue could not write: text token 5 depends on image token 40."""
    plan = CASES["vlm"][0]
    sizes = {"registers": 4, "image": 64, "text": 16}
    module = make(plan, "batched")
    x = torch.randn(1, 84, 16)
    out, _ = module(x, sizes)
    x2 = x.clone()
    x2[0, 4 + 40] += 1.0  # image token 40
    out2, _ = module(x2, sizes)
    text5 = 4 + 64 + 5
    assert (out2[0, text5] - out[0, text5]).abs().max() > 1e-3
    mask = language_mask(plan, sizes)
    assert bool(mask[text5, 4 + 40]) and not bool(mask[text5, text5 + 1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_allowed_counts_equal_the_reference_mask(case: str) -> None:
    plan, size_list = CASES[case]
    for sizes in size_list:
        layout = plan.layout(sizes)
        assert layout.allowed_entries == int(language_mask(plan, sizes).sum())


def _shaped(plan: patternc.Plan) -> set[str]:
    """Groups a neighbourhood reads by coordinates: their size is their shape's."""
    grids = [(call, key) for call in plan.calls for key in call.keys if key.modifiers.grid is not None]
    return {name for call, key in grids for name in (key.name, *call.queries)}


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.parametrize("backend", ["batched", "flex", "varlen", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_cookbook_mask_bf16(case: str, backend: str) -> None:
    """bf16 on the GPU (varlen's kernel, flex compiled) against the float64 reference."""
    plan, size_list = CASES[case]
    module = make(plan, backend, dim=128).cuda()
    for sizes in size_list:
        # hundreds of tokens: several flex blocks (a group with a shape keeps its size)
        sizes = {g: s if g in _shaped(plan) else 37 * s for g, s in sizes.items()}
        n = sum(sizes.values())
        x = torch.randn(1, n, 128, device="cuda", requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, _ = module(x, sizes)
        x64 = x.detach().double().requires_grad_(True)
        ref = reference_pattern_attention(module, x64, plan, sizes)
        assert relative_error(out, ref) < 2e-2, (case, backend, sizes)
        grad = torch.randn_like(ref)
        out.float().backward(grad.float())
        ref.backward(grad)
        assert x.grad is not None and x64.grad is not None
        assert relative_error(x.grad, x64.grad) < 5e-2, (case, backend, sizes)
