"""What the runtime's entry points (``PatternAttention``, ``MixedAttention``,
the ``Transformer``, ``plan.layout``) take: one rule for the order of a sizes
dict, sizes as 0-d tensors, clear messages for sizes of the wrong type and
for ``x`` without its batch dimension; zero gradients, never None, where no
token is a key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from reference import reference_pattern_attention, relative_error

import patternc
from patternc import MixedAttentionConfig, TransformerConfig
from patternc.nn import MixedAttention, PatternAttention, Transformer

SOURCE = "groups a q\na -> a\nq -> a, q\n"
ORDERED = {"a": 2, "q": 3}
REVERSED = {"q": 3, "a": 2}


def _attention(source: str = SOURCE, **options: object) -> PatternAttention:
    torch.manual_seed(0)
    plan = patternc.compile(source).patterns["default"]
    return PatternAttention(MixedAttentionConfig(hidden_dim=8, num_heads=2, **options), plan).double()  # type: ignore[arg-type]


def _stack(source: str = SOURCE) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=None, d_model=8, num_heads=2, num_layers=1, d_ff=16, dropout_rate=0.0
    )
    return Transformer(config, source).double()


ORDER_ERROR = (
    r"E404\]: sizes name \['q', 'a'\] but the plan's groups are \['a', 'q'\] \(in this order\)\n"
    r"  hint: give the groups in the plan's order, the order they have in x"
)


def test_a_sizes_dict_in_another_order_is_refused_at_every_entry_point() -> None:
    """x holds the groups in the plan's order; a dict in another order used
    to be read in the plan's order by some entry points and in its own by
    others (different answers on the same x). Now every one refuses it."""
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    attn = _attention()
    with pytest.raises(patternc.PatternError, match=ORDER_ERROR):
        attn(x, REVERSED)
    with pytest.raises(patternc.PatternError, match=ORDER_ERROR):
        _stack()(x, REVERSED)
    with pytest.raises(patternc.PatternError, match=ORDER_ERROR):
        attn.plan.layout(REVERSED)
    with pytest.raises(patternc.PatternError, match=r"E404\]: token_specs name \['q', 'a'\]"):
        MixedAttention(attn.config).double()(x, REVERSED, attn.plan)
    ref = reference_pattern_attention(attn, x, attn.plan, ORDERED)
    assert relative_error(attn(x, ORDERED)[0], ref) < 1e-12


def test_a_familys_members_sit_in_x_in_the_dicts_order() -> None:
    """Members of a family have no declared order: the dict's is x's."""
    attn = _attention("groups doc*\ndoc* -> self [causal]\n")
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    out = attn(x, {"doc1": 3, "doc0": 5})[0]
    assert relative_error(out, attn(x, {"doc0": 3, "doc1": 5})[0]) < 1e-12
    mixed = _attention("groups text doc*\ntext -> text\ndoc* -> text, doc*\n")
    with pytest.raises(patternc.PatternError, match=r"E404\]: sizes name \['doc0', 'text', 'doc1'\]"):
        mixed(x, {"doc0": 3, "text": 2, "doc1": 3})


def test_sizes_as_zero_dim_integer_tensors() -> None:
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    tensors = {g: torch.tensor(n) for g, n in ORDERED.items()}
    attn = _attention()
    assert relative_error(attn(x, tensors)[0], attn(x, ORDERED)[0]) < 1e-15
    stack = _stack()
    assert relative_error(stack(x, tensors), stack(x, ORDERED)) < 1e-15
    mixed = MixedAttention(attn.config).double()
    mixed.load_state_dict(attn.state_dict())
    assert relative_error(mixed(x, tensors, attn.plan)[0], attn(x, ORDERED)[0]) < 1e-15
    with pytest.raises(
        patternc.PatternError, match=r"size of `a` must be an integer >= 0, got tensor\(2\.\)"
    ):
        attn(x, {"a": torch.tensor(2.0), "q": 3})


def test_sizes_as_a_list_of_numbers_say_which_forms_are_taken() -> None:
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    message = r"sizes must be a \{group: size\} dict or a list of TokenSpec, got \[2, 3\]"
    with pytest.raises(TypeError, match=message):
        _attention()(x, [2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        _stack()(x, [2, 3])  # type: ignore[arg-type]


def test_x_without_its_batch_dimension_says_so() -> None:
    x = torch.randn(5, 8, dtype=torch.float64)
    message = r"x has shape \(5, 8\), which has no batch dimension; expected \[batch, 5, 8\].*x\[None\]"
    attn = _attention()
    with pytest.raises(ValueError, match=message):
        attn(x, ORDERED)
    with pytest.raises(ValueError, match=message):
        MixedAttention(attn.config).double()(x, ORDERED, attn.plan)
    with pytest.raises(ValueError, match=message):
        _stack()(x, ORDERED)
    with pytest.raises(
        ValueError, match=r"x has shape \(1, 4, 8\) but the sizes \(a=2, q=3; .*\) put 5 tokens"
    ):
        attn(x[None, :4], ORDERED)


@pytest.mark.parametrize("implementation", ["batched", "dense", "loop"])
def test_k_norm_gets_zero_gradients_when_no_token_is_a_key(implementation: str) -> None:
    """The docs promise zeros, never None (DDP's unused-parameter check):
    with every key group empty no executor reads K, so ``k_norm`` had None."""
    attn = _attention("groups a q\na -> a\nq -> a\n", qk_norm=True, implementation=implementation)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    out, _ = attn(x, {"a": 0, "q": 4})
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in attn.named_parameters():
        assert parameter.grad is not None, name
    assert attn.k_norm.weight.grad is not None and not attn.k_norm.weight.grad.any()
    assert x.grad is not None and not x.grad.any()  # no key: the output is the bias alone


def test_the_stacks_kv_projection_gets_zero_gradients_when_every_key_group_is_empty() -> None:
    stack = _stack("groups a q\na -> a\nq -> a\n")
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    stack(x, {"a": 0, "q": 4}).sum().backward()
    for name, parameter in stack.named_parameters():
        assert parameter.grad is not None, name
    qkv = stack.layers[0].attention.qkv  # rows: Q, then K and V
    q_rows = stack.config.num_heads * stack.config.head_dim
    assert not qkv.weight.grad[q_rows:].any() and not qkv.bias.grad[q_rows:].any()


def test_numpy_is_a_dependency() -> None:
    """torch warns "Failed to initialize NumPy" on every import without it."""
    text = Path(ROOT / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert re.search(r'"numpy[>=<~ ]', dependencies), dependencies


def test_the_cli_takes_sizes_in_any_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--sizes` fixes no tensor's order: the CLI lays them out in the
    program's order (a family's members in the order given) instead of E404."""
    from patternc.cli import main

    source = tmp_path / "p.pc"
    source.write_text("groups text doc*\ntext -> text\ndoc* -> text, doc*\n")
    assert main(["compile", str(source), "--sizes", "doc1=3,text=2,doc0=4"]) == 0
    out = capsys.readouterr().out
    assert "E404" not in out and "doc1" in out
    assert out.index("doc1") < out.index("doc0")
