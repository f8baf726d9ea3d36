"""patternc as a Hugging Face attention implementation: packed documents give
the logits of running each document alone (a tiny Llama built from its
config, no weights downloaded)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _model(attn: str, kv_heads: int = 2) -> object:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("backend", ["batched", "auto"])
def test_packed_documents_match_one_by_one(kv_heads: int, backend: str) -> None:
    import patternc.hf

    plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
    patternc.hf.register(plan, backend=backend)
    packed_model = _model("patternc", kv_heads)
    alone_model = _model("sdpa", kv_heads)
    alone_model.load_state_dict(packed_model.state_dict())
    sizes = {"doc0": 5, "doc1": 11, "doc2": 1, "doc3": 8}
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, sum(sizes.values())))
    with torch.no_grad():
        packed = packed_model(
            ids, position_ids=patternc.hf.position_ids(sizes), patternc_sizes=sizes, use_cache=False
        )
        start, alone = 0, []
        for n in sizes.values():
            alone.append(alone_model(ids[:, start : start + n], use_cache=False).logits)
            start += n
    expected = torch.cat(alone, dim=1)
    assert ((packed.logits - expected).norm() / expected.norm()).item() < 1e-5


def test_errors_say_what_to_pass() -> None:
    import patternc.hf

    plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
    patternc.hf.register(plan, name="patternc_errors")
    model = _model("patternc_errors")
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match=r"model\(\.\.\., patternc_sizes="):
        model(ids, use_cache=False)
    with pytest.raises(ValueError, match="add up to 4 tokens but the sequence has 6"):
        model(ids, patternc_sizes={"doc0": 4}, use_cache=False)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        patternc.hf.register(plan, backend="nope")


def test_patternc_check_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, patternc; patternc.compile('groups a\\na -> a'); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_example_runs() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "examples/hf_packed_documents.py", "--docs", "3,8,5"],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    diff = re.search(r"max \|packed - one by one\| = (\S+)", done.stdout)
    assert diff is not None and float(diff.group(1)) < 1e-4
