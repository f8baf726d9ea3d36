"""A tiny causal LM over documents packed into one sequence, the document mask
written in the pattern language.

Each document is a counting sequence with its own start and step
(``s, s + k, s + 2k, ...`` modulo the vocabulary); a model that reads the
first tokens of a document can continue it. Every training batch packs a
different number of documents of different lengths into one sequence (a
batch of one row: a batch of several rows, each packed its own way, runs in
one call with one sizes dict per row, see examples/per_row_batches.py). The
mask is one line, resolved against the documents present at run time::

    groups doc*
    doc* -> self [causal]

so the plan is compiled once and never rebuilt; RoPE positions restart in
every document. After training, the script checks that the packed loss equals
the loss of running each document alone, then continues unseen documents with
the KV cache.

Run: ``python examples/packed_lm.py`` (about 15 s; it runs on one CPU thread,
as the tensors are small: ``--threads N`` to change it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _threads import add_threads_option, cpu_threads
from torch import Tensor

import patternc
from patternc import TransformerConfig
from patternc.nn import Transformer

PATTERNS = """
groups doc*
doc* -> self [causal]
"""


def make_document(length: int, vocab: int, generator: torch.Generator) -> Tensor:
    """``[length]`` ids: a counting sequence with a random start and step (ids 1..vocab-1)."""
    start, step = (int(v) for v in torch.randint(0, vocab - 1, (2,), generator=generator))
    step = 1 + step % 7
    return 1 + (start + step * torch.arange(length)) % (vocab - 1)


def packed_batch(
    vocab: int, generator: torch.Generator, min_docs: int = 3, max_docs: int = 12
) -> tuple[Tensor, dict[str, int]]:
    """One packed sequence ``[1, N]`` and its ``{doc_i: length}`` sizes; the
    number and lengths of documents change from batch to batch."""
    n_docs = int(torch.randint(min_docs, max_docs + 1, (1,), generator=generator))
    lengths = torch.randint(6, 33, (n_docs,), generator=generator).tolist()
    docs = [make_document(n, vocab, generator) for n in lengths]
    return torch.cat(docs)[None], {f"doc{i}": n for i, n in enumerate(lengths)}


def packed_loss(model: Transformer, ids: Tensor, sizes: dict[str, int]) -> Tensor:
    """Next-token loss inside each document (no target crosses a boundary)."""
    logits = model(ids, sizes)
    losses = []
    start = 0
    for n in sizes.values():
        losses.append(
            F.cross_entropy(logits[0, start : start + n - 1], ids[0, start + 1 : start + n], reduction="sum")
        )
        start += n
    return torch.stack(losses).sum() / sum(n - 1 for n in sizes.values())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    add_threads_option(parser)
    parser.add_argument(
        "--attention", default="batched", help="attention_type (batched, dense, loop, flex, ...)"
    )
    args = parser.parse_args(argv)
    with cpu_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    program = patternc.compile(PATTERNS)
    config = TransformerConfig(
        vocab_size=args.vocab, d_model=args.dim, num_heads=4, num_layers=args.layers, d_ff=2 * args.dim,
        dropout_rate=0.0, max_len=64, pos_emb_type="rope", attention_type=args.attention,
        kv_cache_max_len=64,
    )  # fmt: skip
    model = Transformer(config, program)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=args.steps, pct_start=0.1)
    data = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    print(f"{'step':>6} {'docs':>5} {'tokens':>7} {'loss':>8}")
    for step in range(1, args.steps + 1):
        ids, sizes = packed_batch(args.vocab, data)
        loss = packed_loss(model, ids, sizes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"{step:>6} {len(sizes):>5} {ids.shape[1]:>7} {loss.item():>8.4f}", flush=True)
    print(f"trained in {time.perf_counter() - start:.1f} s; one plan, {step} different packings")

    model.eval()
    held_out = torch.Generator().manual_seed(2)
    ids, sizes = packed_batch(args.vocab, held_out)
    with torch.no_grad():
        packed = packed_loss(model, ids, sizes).item()
        separate_sum, offset = 0.0, 0
        for n in sizes.values():
            doc = ids[:, offset : offset + n]
            separate_sum += packed_loss(model, doc, {"doc0": n}).item() * (n - 1)
            offset += n
        separate = separate_sum / sum(n - 1 for n in sizes.values())
    print(f"held-out loss: packed {packed:.6f}, documents one by one {separate:.6f} "
          f"(|difference| {abs(packed - separate):.2e})")  # fmt: skip

    correct = total = 0
    for _ in range(8):
        doc = make_document(16, args.vocab, held_out)
        generated = model.generate(doc[None, :4], max_new_tokens=12)
        correct += int((generated[0, 4:] == doc[4:]).sum())
        total += 12
    print(f"generation with the KV cache: {correct}/{total} continuation tokens right "
          f"({correct / total:.0%}); e.g. {doc[:4].tolist()} -> {generated[0, 4:].tolist()}")  # fmt: skip
    return {"loss": loss.item(), "packed": packed, "separate": separate, "generation": correct / total}


if __name__ == "__main__":
    main()
