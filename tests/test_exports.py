"""Exports to other engines' mask formats: each one expanded back to a dense
boolean mask and compared with the mask the language defines, on random
programs and sizes (tests/programs.py) and on the cookbook's layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patternc
from patternc.export import (
    NotExpressible,
    flashmask_bounds,
    magi_slices,
    varlen_launches,
    xformers_mask,
)
from patternc.lower.layout import Layout

sys.path.insert(0, str(Path(__file__).parent))
import reference
from programs import random_program

ROOT = Path(__file__).resolve().parent.parent


def language_mask(layout: Layout) -> torch.Tensor:
    """``[N, N]``: query i sees key j, straight from the language's definition
    (each call's query and key groups; causal ``j <= i``, window ``|i - j| < w``,
    positions within groups)."""
    n = layout.n_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    slots = {s.name: s for s in layout.slots}
    for call in layout.calls:
        for q in call.query_tokens:
            qs = slots[q]
            for key in call.attention.keys:
                ks = slots[key.name]
                if not qs.size or not ks.size:
                    continue
                i = torch.arange(qs.size)[:, None]
                j = torch.arange(ks.size)[None, :]
                ok = torch.ones(qs.size, ks.size, dtype=torch.bool)
                if key.modifiers.causal:
                    ok &= j <= i
                if key.modifiers.window is not None:
                    ok &= (i - j).abs() < key.modifiers.window
                mask[qs.offset : qs.offset + qs.size, ks.offset : ks.offset + ks.size] |= ok
    return mask


def expand_magi(layout: Layout) -> torch.Tensor:
    n = layout.n_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    for s in magi_slices(layout):
        (qa, qb), (ka, kb) = s.q_range, s.k_range
        i = torch.arange(qb - qa)[:, None]
        j = torch.arange(kb - ka)[None, :]
        ok = torch.ones(qb - qa, kb - ka, dtype=torch.bool)
        if s.mask_type in ("CAUSAL", "BICAUSAL"):
            ok &= j <= i + (kb - ka) - (qb - qa)
        if s.mask_type in ("INVCAUSAL", "BICAUSAL"):
            ok &= j >= i
        mask[qa:qb, ka:kb] |= ok
    return mask


def expand_flashmask(layout: Layout) -> torch.Tensor:
    bounds = flashmask_bounds(layout)
    n = bounds.n_tokens
    rows = torch.arange(n)[:, None]
    lts, lte = torch.tensor(bounds.lts)[None], torch.tensor(bounds.lte)[None]
    uts, ute = torch.tensor(bounds.uts)[None], torch.tensor(bounds.ute)[None]
    masked = ((rows >= lts) & (rows < lte)) | ((rows >= uts) & (rows < ute))
    return ~masked


def expand_varlen(layout: Layout) -> torch.Tensor:
    n = layout.n_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    for launch in varlen_launches(layout):
        left, right = launch.window
        for s in range(len(launch.cu_seqlens_q) - 1):
            qs = launch.q_rows[launch.cu_seqlens_q[s] : launch.cu_seqlens_q[s + 1]]
            ks = launch.kv_rows[launch.cu_seqlens_k[s] : launch.cu_seqlens_k[s + 1]]
            i = torch.arange(len(qs))[:, None]
            j = torch.arange(len(ks))[None, :]
            ok = torch.ones(len(qs), len(ks), dtype=torch.bool)
            if left >= 0:
                ok &= i - j <= left
            if right >= 0:
                ok &= j - i <= right
            mask[
                torch.tensor(qs, dtype=torch.long)[:, None], torch.tensor(ks, dtype=torch.long)[None, :]
            ] |= ok
    return mask


def expand_xformers(layout: Layout) -> torch.Tensor:
    spec = xformers_mask(layout)
    n = layout.n_tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    q_at = 0
    k_starts = spec.kv_seqstarts or tuple(sum(spec.kv_seqlen[:b]) for b in range(len(spec.kv_seqlen)))
    for b, (lq, lk) in enumerate(zip(spec.q_seqlen, spec.kv_seqlen)):
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        ok = torch.ones(lq, lk, dtype=torch.bool)
        if spec.kind.startswith("BlockDiagonalCausal"):
            ok &= j <= i
        if spec.window_size is not None:
            ok &= i - j < spec.window_size
        mask[q_at : q_at + lq, k_starts[b] : k_starts[b] + lk] |= ok
        q_at += lq
    return mask


def expand_flex(layout: Layout) -> torch.Tensor:
    from patternc.export import flex_mask_mod

    n = layout.n_tokens
    mask_mod = flex_mask_mod(layout)
    i = torch.arange(n)
    return mask_mod(torch.tensor(0), torch.tensor(0), i[:, None], i[None, :])


EXPANSIONS = {
    "magi": expand_magi,
    "flashmask": expand_flashmask,
    "varlen": expand_varlen,
    "xformers": expand_xformers,
    "flex": expand_flex,
}


def _layouts(seed: int) -> list[tuple[Layout, torch.Tensor]]:
    """Each pattern's layout of a random program, with its mask from the
    language's definition (``reference.language_mask``: neighbourhoods on
    shaped groups and the band modifiers included)."""
    source, sizes = random_program(seed)
    program = patternc.compile(source)
    return [(plan.layout(sizes), reference.language_mask(plan, sizes)) for plan in program.patterns.values()]


@pytest.mark.parametrize("name", sorted(EXPANSIONS))
def test_exports_are_exact_on_random_programs(name: str) -> None:
    expanded = 0
    for seed in range(240):
        for layout, want in _layouts(seed):
            try:
                got = EXPANSIONS[name](layout)
            except NotExpressible as reason:
                assert str(reason)
                # flex says every plan; Magi every plan without a neighbourhood
                # on a shaped group (its slices are ranges of whole rows)
                assert name != "flex", reason
                assert name != "magi" or _has_neighbourhood(layout), reason
                continue
            assert torch.equal(got, want), (name, seed, layout.plan_name)
            expanded += 1
    assert expanded > 20  # the check ran on real cases


def _has_neighbourhood(layout: Layout) -> bool:
    return any(k.modifiers.grid is not None for call in layout.calls for k in call.attention.keys)


COOKBOOK = {
    "prefix_lm": {"prefix": 7, "text": 9},
    "vlm": {"registers": 2, "image": 6, "text": 9},
    "packed_causal": {"doc0": 5, "doc1": 8, "doc2": 3},
    "sliding_window_global": {"global": 2, "tokens": 17},
    "perceiver": {"latents": 4, "inputs": 11},
    "video_frames": {"prompt": 3, "frame0": 5, "frame1": 5, "frame2": 5},
    "block_diffusion": {"noisy0": 4, "noisy1": 3, "clean0": 4, "clean1": 3},
    "interleaved_vlm": {"system": 2, "run0.image": 5, "run1.text": 3, "run2.image": 4, "run3.text": 6},
    "prefix_per_document": {"doc0.prefix": 3, "doc0.text": 5, "doc1.prefix": 2, "doc1.text": 7},
    "shared_question": {"qa0.question": 4, "qa0.answer0": 3, "qa0.answer1": 5, "qa1.question": 3},
    "sliding_tiles": {**{f"tile{r}_{c}": 3 for r in range(3) for c in range(3)}, "caption": 4},
    "perceiver_read_only": {"latents": 4, "inputs": 11},
}


@pytest.mark.parametrize("name", sorted(COOKBOOK))
def test_exports_are_exact_on_the_cookbook(name: str) -> None:
    program = patternc.compile(ROOT / "examples" / "cookbook" / f"{name}.patc")
    sizes = COOKBOOK[name]
    for plan in program.patterns.values():
        layout = plan.layout(sizes)
        want = language_mask(layout)
        for format_name, expand in EXPANSIONS.items():
            try:
                got = expand(layout)
            except NotExpressible:
                continue
            assert torch.equal(got, want), (name, format_name)


def _layout(source: str, sizes: dict[str, int]) -> Layout:
    return patternc.compile(source).patterns["default"].layout(sizes)


def test_magi_uses_the_triangle_types() -> None:
    causal = magi_slices(_layout("groups doc\ndoc -> doc [causal]", {"doc": 6}))
    assert [(s.q_range, s.k_range, s.mask_type) for s in causal] == [((0, 6), (0, 6), "CAUSAL")]
    window = magi_slices(_layout("groups doc\ndoc -> doc [causal, window 3]", {"doc": 8}))
    assert {s.mask_type for s in window} == {"CAUSAL", "BICAUSAL"}


def test_documents_are_a_block_diagonal_causal_mask() -> None:
    spec = xformers_mask(_layout("groups doc*\ndoc* -> self [causal]", {"doc0": 3, "doc1": 5}))
    assert spec.kind == "BlockDiagonalCausalMask" and spec.q_seqlen == (3, 5) == spec.kv_seqlen
    docs = xformers_mask(_layout("groups doc*\ndoc* -> self", {"doc0": 3, "doc1": 5}))
    assert docs.kind == "BlockDiagonalMask"
    local = xformers_mask(_layout("groups doc*\ndoc* -> self [causal, window 2]", {"doc0": 3, "doc1": 5}))
    assert local.kind == "BlockDiagonalCausalLocalAttentionMask" and local.window_size == 2


def test_refusals_say_why() -> None:
    vlm = _layout("groups image text\nimage -> image\ntext -> image, text[causal]", {"image": 3, "text": 4})
    with pytest.raises(NotExpressible, match="per-key modifiers that differ within one call"):
        varlen_launches(vlm)
    joint = _layout("groups a b c\n* -> a, c", {"a": 2, "b": 3, "c": 2})
    with pytest.raises(NotExpressible, match="several runs of the input"):
        xformers_mask(joint)
    cached = patternc.compile("groups a q\n* -> a").patterns["default"].layout({"a": None, "q": 3})
    with pytest.raises(NotExpressible, match="KV cache"):
        magi_slices(cached)
    gaps = _layout("groups a b c d\na, c -> a, c\nb, d -> b, d", {"a": 2, "b": 2, "c": 2, "d": 2})
    with pytest.raises(NotExpressible, match="more than one run of queries below the diagonal"):
        flashmask_bounds(gaps)


def test_flex_block_mask_runs_flex_attention() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from patternc.export import flex_block_mask, padded_length

    layout = _layout("groups doc*\ndoc* -> self [causal]", {"doc0": 100, "doc1": 60})
    n = padded_length(layout)
    block_mask = flex_block_mask(layout)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=block_mask)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:160, :160] = language_mask(layout)
    mask[160:, 0] = True  # padding rows: any finite row (not compared)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(out[..., :160, :], ref[..., :160, :], atol=1e-5)


def test_cli_prints_engine_formats_without_torch() -> None:
    code = (
        "import sys, runpy; sys.argv = ['patternc', 'compile', 'examples/ab_upt.patc', '--sizes', "
        "'surface_anchors=2,surface_queries=3,volume_anchors=2,volume_queries=3', '--format', 'magi', "
        "'--pattern', 'self_anchor']\n"
        "try:\n    runpy.run_module('patternc', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    data = json.loads(done.stdout)
    slices = data["patterns"]["self_anchor"]["slices"]
    assert slices[0] == {"q_range": [0, 5], "k_range": [0, 2], "mask_type": "FULL"}
    assert done.stderr.strip().endswith("False")


def test_cli_engine_format_errors() -> None:
    base = [sys.executable, "-m", "patternc", "compile", "examples/ab_upt.patc"]
    no_sizes = subprocess.run([*base, "--format", "flashmask"], capture_output=True, text=True, cwd=ROOT)
    assert no_sizes.returncode == 2 and "--format flashmask needs --sizes" in no_sizes.stderr
    sizes = "surface_anchors=2,surface_queries=3,volume_anchors=2,volume_queries=3"
    refused = subprocess.run(
        [*base, "--sizes", sizes, "--format", "xformers"], capture_output=True, text=True, cwd=ROOT
    )
    assert refused.returncode == 1 and "xformers cannot express pattern joint" in refused.stderr
    data = json.loads(refused.stdout)
    assert data["patterns"]["joint"]["expressible"] is False
    assert data["patterns"]["self_anchor"]["type"] == "BlockDiagonalGappyKeysMask"
