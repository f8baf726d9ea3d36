"""Group families (``groups doc*``) and ``-> self``: one plan serves any
number of run-time groups, e.g. a different set of packed documents per batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import relative_error
from test_flex import make, reference_with_modifiers

import patternc
from patternc import PatternError
from patternc.cli import main
from patternc.nn.schedule import schedule_for

PACKED = patternc.compile("""
groups prompt doc*
prompt -> prompt
doc* -> self [causal]
""").patterns["default"]


def test_family_binds_to_the_groups_present() -> None:
    bound = PACKED.bind(["prompt", "doc0", "doc1", "doc2"])
    assert bound.groups == ("prompt", "doc0", "doc1", "doc2")
    assert [(r.queries, r.keys_values) for r in bound.rules] == [
        (("prompt",), ("prompt",)),
        (("doc0",), ("doc0",)),
        (("doc1",), ("doc1",)),
        (("doc2",), ("doc2",)),
    ]
    assert all(k.modifiers.causal for r in bound.rules[1:] for k in r.keys)
    # members share the family's type (one weight bank for every document)
    assert bound.types == {"prompt": "prompt", "doc0": "doc", "doc1": "doc", "doc2": "doc"}
    # the plan is not rebuilt per batch: bindings are cached per set of names
    assert PACKED.bind(["prompt", "doc0", "doc1", "doc2"]) is bound
    assert PACKED.bind(["prompt"]).groups == ("prompt",)


def test_family_without_self_attends_across_members() -> None:
    plan = patternc.compile("groups q doc*\nq -> doc*\ndoc* -> doc*").patterns["default"]
    bound = plan.bind(["q", "doc_a", "doc_b"])
    assert [(r.queries, r.keys_values) for r in bound.rules] == [
        (("q",), ("doc_a", "doc_b")),
        (("doc_a", "doc_b"), ("doc_a", "doc_b")),
    ]


def test_self_on_plain_groups() -> None:
    plan = patternc.compile("groups a b c\na, b -> self\nc -> a, c").patterns["default"]
    assert [(p.query_tokens, p.key_value_tokens) for p in plan.patterns] == [
        (("a",), ("a",)),
        (("b",), ("b",)),
        (("c",), ("a", "c")),
    ]


@pytest.mark.parametrize("impl", ["batched", "loop", "dense"])
@pytest.mark.parametrize("doc_sizes", [[5], [3, 8, 1], [13, 2, 7, 4, 9]])
def test_packed_documents_match_reference(impl: str, doc_sizes: list[int]) -> None:
    sizes = {"prompt": 3, **{f"doc{i}": n for i, n in enumerate(doc_sizes)}}
    module = make(PACKED, impl)
    x = torch.randn(2, sum(sizes.values()), 16)
    out, _ = module(x, sizes)
    reference = reference_with_modifiers(make(PACKED.bind(list(sizes)), impl), x, sizes)
    assert relative_error(out, reference) < 1e-5


@pytest.mark.parametrize("impl", ["batched", "loop"])
@pytest.mark.parametrize("doc_sizes", [[5], [3, 8, 1], [13, 2, 7, 4, 9]])
def test_packed_documents_gradients_match_reference(impl: str, doc_sizes: list[int]) -> None:
    sizes = {"prompt": 3, **{f"doc{i}": n for i, n in enumerate(doc_sizes)}}
    module = make(PACKED, impl)
    x = torch.randn(2, sum(sizes.values()), 16, requires_grad=True)
    weight = torch.randn(2, sum(sizes.values()), 16)
    (module(x, sizes)[0] * weight).sum().backward()
    grads = [x.grad, *(p.grad for p in module.parameters())]
    module.zero_grad()
    x_ref = x.detach().double().requires_grad_()
    reference_module = make(PACKED.bind(list(sizes)), impl)
    reference_module.load_state_dict(module.state_dict())
    (reference_with_modifiers(reference_module, x_ref, sizes) * weight.double()).sum().backward()
    ref_grads = [x_ref.grad, *(p.grad for p in reference_module.parameters())]
    for got, want in zip(grads, ref_grads):
        assert got is not None and want is not None
        assert relative_error(got, want) < 1e-5


def test_one_module_serves_changing_document_sets() -> None:
    """Packing documents with the family mask gives each document exactly what
    it gets alone, whatever else is packed with it."""
    module = make(PACKED, "batched")
    docs = [torch.randn(1, n, 16) for n in (6, 11, 4)]
    prompt = torch.randn(1, 2, 16)
    alone = [module(torch.cat([prompt, d], 1), {"prompt": 2, "doc0": d.shape[1]})[0][:, 2:] for d in docs]
    sizes = {"prompt": 2, **{f"doc{i}": d.shape[1] for i, d in enumerate(docs)}}
    packed, _ = module(torch.cat([prompt, *docs], 1), sizes)
    assert relative_error(packed[:, 2:], torch.cat(alone, 1)) < 1e-5


def test_schedules_cached_per_document_set() -> None:
    first = schedule_for(PACKED.token_specs({"prompt": 1, "doc0": 4, "doc1": 5}), PACKED)
    again = schedule_for(PACKED.token_specs({"prompt": 1, "doc0": 4, "doc1": 5}), PACKED)
    assert first is again
    assert len(first.calls) == 3


def test_unknown_member_is_reported_with_families() -> None:
    with pytest.raises(PatternError) as error:
        PACKED.token_specs({"prompt": 1, "image": 3})
    (diag,) = error.value.diagnostics
    assert diag.code == "E405"
    assert "`image` is neither a declared group nor a member of a family" in diag.message
    assert diag.hint is not None and "`doc*`" in diag.hint


def test_family_without_members_cannot_be_the_only_keys() -> None:
    plan = patternc.compile("groups q doc*\nq -> doc*\ndoc* -> self").patterns["default"]
    with pytest.raises(PatternError) as error:
        plan.token_specs({"q": 2})
    assert "has queries but no keys" in str(error.value)


def test_self_beside_keys_that_select_the_group_is_refused() -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile("groups a b\na -> a, self\nb -> b")
    (diag,) = error.value.diagnostics
    assert diag.code == "E205" and (diag.line, diag.column) == (2, 9)
    assert "`self` repeats `a`, which already selects `a` itself" in diag.message
    assert diag.hint is not None and "drop `self` or `a`" in diag.hint


@pytest.mark.parametrize(
    ("source", "column"), [("groups a b\nself -> a\nb -> b", 1), ("groups a b\na -> b - self\nb -> b", 10)]
)
def test_self_outside_the_keys_is_refused(source: str, column: int) -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    diag = next(d for d in error.value.diagnostics if d.code == "E204")
    assert (diag.line, diag.column) == (2, column)
    assert "`self` can only stand among the keys of a rule" in diag.message
    assert diag.hint is not None and "answer* -> question, self[causal]" in diag.hint


def test_cli_lays_out_a_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "packed.pc"
    source.write_text("groups prompt doc*\nprompt -> prompt\ndoc* -> self [causal]\n")
    assert main(["compile", str(source), "--sizes", "prompt=2,doc0=3,doc1=4", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (pattern,) = data["patterns"]
    assert pattern["bound_groups"] == ["prompt", "doc0", "doc1"]
    assert [c["n_queries"] for c in pattern["layout"]["calls"]] == [2, 3, 4]
