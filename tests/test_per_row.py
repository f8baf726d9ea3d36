"""One packing per row: a batch whose rows hold different groups or sizes,
run in one call, against each row run alone with its own sizes dict (and a
float64 dense-mask reference), forward and backward, for every executor and
for the Transformer stack; the error messages of the per-row form."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch
from reference import reference_pattern_attention, relative_error
from torch import Tensor

import patternc
from patternc import MixedAttentionConfig, PatternError, TransformerConfig
from patternc.nn import PatternAttention, Transformer
from patternc.nn.rope import rope_frequencies

VLM = "groups image text\nimage -> image\ntext -> image, text[causal]"
PACKED = "groups doc*\ndoc* -> self [causal]"
ANCHORS = "groups anchors queries\nanchors -> anchors\nqueries -> anchors, queries [window 3]"

VLM_ROWS = [
    {"image": 5, "text": 7},
    {"image": 0, "text": 3},
    {"image": 9, "text": 1},
    {"image": 4, "text": 0},
]
PACKED_ROWS = [
    {"doc0": 4, "doc1": 3, "doc2": 5},
    {"doc0": 11},
    {"doc0": 1, "doc1": 0, "doc2": 2, "doc3": 6, "doc4": 1},
]
ANCHOR_ROWS = [{"anchors": 3, "queries": 8}, {"anchors": 6, "queries": 1}]

CASES = [(VLM, VLM_ROWS), (PACKED, PACKED_ROWS), (ANCHORS, ANCHOR_ROWS)]
BACKENDS = ["batched", "loop", "dense", "flex", "auto"]


def plan_of(source: str) -> patternc.Plan:
    return patternc.compile(source).patterns["default"]


def padded(rows: Sequence[dict[str, int]], width: int, extra: int = 2, seed: int = 0) -> Tensor:
    """``[B, N_max, width]`` float64, random, the padding random too (it must not matter)."""
    generator = torch.Generator().manual_seed(seed)
    n_max = max(sum(r.values()) for r in rows) + extra
    return torch.randn(len(rows), n_max, width, generator=generator, dtype=torch.float64)


def layer(source: str, backend: str, hidden: int = 24, heads: int = 3) -> PatternAttention:
    torch.manual_seed(1)
    config = MixedAttentionConfig(
        hidden_dim=hidden, num_heads=heads, bias=True, init_weights="truncnormal002"
    )
    return PatternAttention(config, plan_of(source), backend=backend).double()  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("source", "rows"), CASES, ids=["vlm", "packed", "anchors"])
def test_rows_match_each_row_alone(backend: str, source: str, rows: list[dict[str, int]]) -> None:
    attn = layer(source, backend)
    x = padded(rows, 24).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on the CPU runs as batched for gradients, and says so
        out, cache = attn(x, rows)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
    assert cache is None
    assert out.shape == x.shape
    grad_x = x.grad
    assert grad_x is not None
    grads = {name: p.grad.clone() for name, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad()
    alone_grads = {name: torch.zeros_like(p) for name, p in attn.named_parameters()}
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        assert out[r, n:].abs().max() == 0 if n < x.shape[1] else True  # padding: zero output
        xr = x.detach()[r : r + 1, :n].clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone, _ = attn(xr, sizes)
        reference = reference_pattern_attention(attn, xr, attn.plan, sizes)
        assert relative_error(out[r : r + 1, :n], alone) < 1e-12
        assert relative_error(out[r : r + 1, :n], reference) < 1e-12
        (alone * weights[r : r + 1, :n]).sum().backward()
        assert xr.grad is not None
        assert relative_error(grad_x[r : r + 1, :n], xr.grad) < 1e-12
        for name, p in attn.named_parameters():
            if p.grad is not None:
                alone_grads[name] += p.grad
        attn.zero_grad()
        assert grad_x[r, n:].abs().max() == 0 if n < x.shape[1] else True  # padding gets no gradient
    for name, grad in grads.items():
        assert relative_error(grad, alone_grads[name]) < 1e-12, name


@pytest.mark.parametrize("seed", range(4))
def test_random_packings_against_reference(seed: int) -> None:
    """Random rows (1 to 4), each packing 1 to 4 documents of 0 to 9 tokens."""
    generator = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator))

    rows = [{f"doc{i}": draw(10) for i in range(1 + draw(4))} for _ in range(1 + draw(4))]
    attn = layer(PACKED, ["batched", "dense", "loop", "auto"][seed])
    x = padded(rows, 24, extra=draw(3), seed=seed)
    out, _ = attn(x, rows)
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        reference = reference_pattern_attention(attn, x[r : r + 1, :n], attn.plan, sizes)
        assert relative_error(out[r : r + 1, :n], reference) < 1e-12, rows
        assert not out[r, n:].any()


@pytest.mark.parametrize("backend", ["batched", "dense", "loop", "auto"])
def test_rows_without_tokens(backend: str) -> None:
    """Every group of every row empty: zero output, zero gradients (not None)."""
    attn = layer(VLM, backend)
    x = padded([{"image": 0, "text": 0}] * 2, 24, extra=3).requires_grad_()
    out, _ = attn(x, [{"image": 0, "text": 0}] * 2)
    out.sum().backward()
    assert out.shape == x.shape and not out.any()
    assert x.grad is not None and not x.grad.any()
    assert all(p.grad is not None for p in attn.parameters())


def test_rows_with_rope_and_key_padding() -> None:
    attn = layer(VLM, "batched", hidden=16, heads=2)
    attn.use_rope = True
    rows = VLM_ROWS
    x = padded(rows, 16, seed=3)
    n_max = x.shape[1]
    freqs = rope_frequencies(torch.arange(n_max), 8)
    mask = torch.rand(len(rows), n_max, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    out, _ = attn(x, rows, key_padding_mask=mask, freqs=freqs)
    batch_freqs = freqs[None].expand(len(rows), -1, -1)
    out_b, _ = attn(x, rows, key_padding_mask=mask, freqs=batch_freqs)
    assert relative_error(out_b, out) < 1e-14
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        alone, _ = attn(x[r : r + 1, :n], sizes, key_padding_mask=mask[r : r + 1, :n], freqs=freqs[:n])
        assert relative_error(out[r : r + 1, :n], alone) < 1e-12


def test_same_layout_every_row_matches_one_dict() -> None:
    """Rows that all carry one layout give what one dict for the batch gives."""
    attn = layer(ANCHORS, "batched")
    sizes = {"anchors": 5, "queries": 6}
    x = padded([sizes] * 3, 24, extra=0)
    per_row, _ = attn(x, [sizes] * 3)
    shared, _ = attn(x, sizes)
    assert relative_error(per_row, shared) < 1e-12


@pytest.mark.parametrize("untied", [False, True])
def test_transformer_token_model_rows(untied: bool) -> None:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=41, d_model=24, num_heads=3, num_layers=2, d_ff=40, dropout_rate=0.0, max_len=32,
        pos_emb_type="rope", untied=untied, pad_token_id=0,
    )  # fmt: skip
    model = Transformer(config, VLM if untied else PACKED).double()
    rows = VLM_ROWS if untied else PACKED_ROWS
    n_max = max(sum(r.values()) for r in rows) + 3
    ids = torch.randint(1, 41, (len(rows), n_max), generator=torch.Generator().manual_seed(6))
    ids[0, 2] = 0  # a pad id inside a row: masked as a key, in the row alone too
    logits = model(ids, rows)
    assert logits.shape == (len(rows), n_max, 41)
    logits.logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        alone = model(ids[r : r + 1, :n], sizes)
        assert relative_error(logits[r : r + 1, :n], alone) < 1e-12
        assert logits[r, n:].abs().max() == 0
        alone.logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                alone_grads[name] += p.grad
        model.zero_grad()
    for name, grad in grads.items():
        assert relative_error(grad, alone_grads[name]) < 1e-12, name


def test_transformer_feature_rows_with_padding_mask() -> None:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=None, d_model=16, num_heads=2, num_layers=1, d_ff=24, dropout_rate=0.0, max_len=32
    )
    model = Transformer(config, ANCHORS).double()
    rows = ANCHOR_ROWS
    x = padded(rows, 16, seed=8)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[0, 4] = False
    out = model(x, rows, key_padding_mask=mask)
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        alone = model(x[r : r + 1, :n], sizes, key_padding_mask=mask[r : r + 1, :n])
        assert relative_error(out[r : r + 1, :n], alone) < 1e-12


def test_plan_per_row_renames_rows_apart() -> None:
    plan = plan_of(PACKED)
    stacked = plan.per_row([["doc0", "doc1"], ["doc0"]])
    assert stacked.groups == ("doc0@0", "doc1@0", "doc0@1")
    assert {q for rule in stacked.rules for q in rule.queries} == set(stacked.groups)
    for rule in stacked.rules:  # no rule reads another row
        rows = {name.split("@")[1] for name in (*rule.queries, *rule.keys_values)}
        assert len(rows) == 1
    assert plan.per_row([["doc0", "doc1"], ["doc0"]]) is stacked  # cached
    vlm = plan_of(VLM).per_row([["image", "text"]] * 2)
    assert vlm.types == {"image@0": "image", "text@0": "text", "image@1": "image", "text@1": "text"}


# ------------------------------------------------------------------ errors


def test_error_list_length_differs_from_batch() -> None:
    attn = layer(VLM, "batched")
    with pytest.raises(
        ValueError, match=r"sizes has 2 dicts \(one per row\) but x has 4 rows.*one sizes dict per row"
    ):
        attn(padded(VLM_ROWS, 24), VLM_ROWS[:2])


def test_error_row_longer_than_x() -> None:
    attn = layer(VLM, "batched")
    x = padded(VLM_ROWS, 24, extra=0)[:, :10]
    with pytest.raises(ValueError, match=r"row 0 of sizes holds 12 tokens \(image=5, text=7\) but x has 10 positions "
                       r"per row .*pad x to the longest row, N_max >= 12"):  # fmt: skip
        attn(x, VLM_ROWS)


def test_error_row_names_unknown_group() -> None:
    attn = layer(VLM, "batched")
    rows = [{"image": 2, "text": 3}, {"image": 2, "txt": 3}]
    with pytest.raises(PatternError) as error:
        attn(padded(rows, 24), rows)
    text = str(error.value)
    assert "E401" in text and "row 1: sizes name ['txt']" in text and "drop or rename these in row 1" in text
    assert "E403" in text and "row 1: no size for ['text']" in text


def test_error_row_family_member_and_order() -> None:
    attn = layer(PACKED, "batched")
    rows = [{"doc0": 2}, {"page0": 3}]
    with pytest.raises(PatternError, match=r"row 1: group `page0` is neither a declared group"):
        attn(padded(rows, 24), rows)
    vlm = layer(VLM, "batched")
    rows = [{"image": 2, "text": 3}, {"text": 3, "image": 2}]
    with pytest.raises(PatternError, match=r"row 1: sizes name \['text', 'image'\].*in this order") as error:
        vlm(padded(rows, 24), rows)
    assert "give the groups in the plan's order" in str(error.value)


@pytest.mark.parametrize("bad", [None, -1, 2.5])
def test_error_row_size_not_an_integer(bad: object) -> None:
    attn = layer(VLM, "batched")
    rows: list[dict[str, object]] = [{"image": 2, "text": 3}, {"image": bad, "text": 3}]
    with pytest.raises(ValueError, match=r"sizes\[1\]\['image'\] is .*an integer >= 0"):
        attn(padded([{"a": 5}, {"a": 5}], 24), rows)


def test_error_kv_cache_with_rows() -> None:
    attn = layer(VLM, "batched")
    with pytest.raises(ValueError, match="kv_cache cannot be combined with one sizes dict per row"):
        attn(padded(VLM_ROWS, 24), VLM_ROWS, kv_cache={})


def test_error_x_without_rows() -> None:
    attn = layer(VLM, "batched")
    with pytest.raises(ValueError, match=r"with one sizes dict per row, x is \[batch, N_max, \.\.\.\]"):
        attn(torch.randn(24, dtype=torch.float64), VLM_ROWS)


def test_error_transformer_rows_length() -> None:
    config = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, num_layers=1, d_ff=8, max_len=16)
    model = Transformer(config, PACKED)
    with pytest.raises(ValueError, match="sizes has 1 dicts .* x has 2 rows"):
        model(torch.zeros(2, 5, dtype=torch.long), [{"doc0": 5}])
