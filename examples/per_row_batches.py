"""One packing per row: a batch whose rows hold different documents, or
images and texts of different lengths, run in one call.

``sizes`` is a list of dicts, one per row of ``x``; each row's tokens start
at position 0 and are right-padded to the longest row. Each row attends as
it would alone with its own dict, the padding is read by no query, and its
output is zero. Two batches show it:

- a packed causal LM (``doc* -> self [causal]``) whose rows pack different
  numbers of documents of different lengths: the loss of the padded batch
  equals the loss of each row run alone;
- a vision-language layer (image tokens bidirectional, text causal over
  itself and full over the image) whose rows hold images and texts of
  different lengths, one row without an image.

Run: ``python examples/per_row_batches.py`` (a few seconds on one CPU thread;
``--threads N`` to change it).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

import patternc
from patternc import MixedAttentionConfig, TransformerConfig
from patternc.nn import PatternAttention, Transformer

PACKED = """
groups doc*
doc* -> self [causal]
"""

VLM = """
groups image text
image -> image
text -> image, text[causal]
"""


def pad_rows(rows: list[Tensor], n_max: int) -> Tensor:
    """Rows of different lengths (their leading dimension) right-padded with zeros to ``n_max``."""
    out = rows[0].new_zeros(len(rows), n_max, *rows[0].shape[1:])
    for r, row in enumerate(rows):
        out[r, : row.shape[0]] = row
    return out


def document_loss(logits: Tensor, ids: Tensor, sizes: dict[str, int]) -> Tensor:
    """Summed next-token loss inside each document of one row (``logits`` ``[N, vocab]``)."""
    total, start = logits.new_zeros(()), 0
    for n in sizes.values():
        if n > 1:
            total = total + F.cross_entropy(
                logits[start : start + n - 1], ids[start + 1 : start + n], reduction="sum"
            )
        start += n
    return total


def packed_lm(generator: torch.Generator) -> float:
    """Logits of a padded batch of differently packed rows against each row alone."""
    vocab = 50
    config = TransformerConfig(
        vocab_size=vocab, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout_rate=0.0,
        max_len=64, pos_emb_type="rope",
    )  # fmt: skip
    model = Transformer(config, PACKED).double()
    rows = [
        {"doc0": 7, "doc1": 12, "doc2": 5},
        {"doc0": 30},
        {"doc0": 3, "doc1": 4, "doc2": 9, "doc3": 2, "doc4": 6},
    ]
    ids = [torch.randint(1, vocab, (sum(r.values()),), generator=generator) for r in rows]
    n_max = max(len(t) for t in ids)
    batch = pad_rows(ids, n_max)  # [3, 30]: row 0 holds 24 tokens, row 2 holds 24
    logits = model(batch, rows)  # one call: [3, 30, vocab], zero at the padding
    loss = sum(document_loss(logits[r], ids[r], s) for r, s in enumerate(rows))
    alone = sum(document_loss(model(ids[r][None], s)[0], ids[r], s) for r, s in enumerate(rows))
    assert isinstance(loss, Tensor) and isinstance(alone, Tensor)
    difference = abs(float(loss) - float(alone))
    print(f"packed LM: {len(rows)} rows, documents per row {[len(r) for r in rows]}, N_max {n_max}")
    print(f"  loss of the batch {float(loss):.6f}, of the rows alone {float(alone):.6f}")
    print(f"  |difference| {difference:.1e}")
    return difference


def vlm(generator: torch.Generator) -> float:
    """A VLM attention layer over rows of different image and text lengths, against each row alone."""
    plan = patternc.compile(VLM).patterns["default"]
    attn = PatternAttention(MixedAttentionConfig(hidden_dim=32, num_heads=4), plan).double()
    rows = [{"image": 16, "text": 5}, {"image": 4, "text": 19}, {"image": 0, "text": 11}]
    tokens = [torch.randn(sum(r.values()), 32, generator=generator, dtype=torch.float64) for r in rows]
    n_max = max(len(t) for t in tokens)
    out, _ = attn(pad_rows(tokens, n_max), rows)  # one call for the batch
    worst = 0.0
    for r, sizes in enumerate(rows):
        n = sum(sizes.values())
        alone, _ = attn(tokens[r][None], sizes)
        worst = max(worst, float((out[r, :n] - alone[0]).abs().max()))
    print(f"VLM layer: rows {rows}, N_max {n_max}")
    print(f"  max |batch - row alone| {worst:.1e}")
    return worst


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tensors are small)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    return {"packed_lm": packed_lm(generator), "vlm": vlm(generator)}


if __name__ == "__main__":
    main()
