"""Packed documents in a Hugging Face Llama through patternc's attention.

A tiny Llama is built from its config (no weights downloaded). Documents of
different lengths are packed into one row; with `doc* -> self [causal]`
each attends only to itself, and positions restart per document, so the
logits equal running every document on its own. Needs `pip install 'patternc[hf]'`.

    python examples/hf_packed_documents.py [--docs 5,17,9,30]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import patternc
import patternc.hf


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", default="5,17,9,30", help="document lengths")
    args = parser.parse_args()
    lengths = [int(n) for n in args.docs.split(",")]
    sizes = {f"doc{i}": n for i, n in enumerate(lengths)}

    plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
    patternc.hf.register(plan)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    packed_model = LlamaForCausalLM._from_config(config, attn_implementation="patternc").eval()
    alone_model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    alone_model.load_state_dict(packed_model.state_dict())

    ids = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    with torch.no_grad():
        packed = packed_model(
            ids, position_ids=patternc.hf.position_ids(sizes), patternc_sizes=sizes, use_cache=False
        ).logits
        pieces, start = [], 0
        for n in lengths:
            pieces.append(alone_model(ids[:, start : start + n], use_cache=False).logits)
            start += n
    alone = torch.cat(pieces, dim=1)
    shown = ", ".join(map(str, lengths))
    print(f"{len(lengths)} documents ({shown} tokens) packed into one row of {sum(lengths)}")
    print(f"max |packed - one by one| = {(packed - alone).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
