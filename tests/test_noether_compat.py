"""``patternc.compat.noether`` against golden files written by the real peer
package (emmiai-noether 2026.4.0, ``tests/golden/noether/make_golden.py``).

Each case loads the peer module's state dict strictly into the compat module
built by the same code (``tests/noether_cases.py``) and compares outputs and
gradients (every input and every parameter, by name) in float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from noether_cases import CASES, UNBALANCED, Case, grad_target
from torch import Tensor, nn

import patternc
import patternc.compat.noether as compat
from patternc.compat.noether import (
    AttentionPattern,
    LinearProjectionConfig,
    SquareBankWarning,
    TokenSpec,
    TransformerBlockConfig,
    UntiedLinear,
    UntiedLinearConfig,
    UntiedTransformerBlock,
    UntiedTransformerBlockConfig,
    set_square_banks,
)

GOLDEN = Path(__file__).parent / "golden" / "noether"
NS = SimpleNamespace(**{name: getattr(compat, name) for name in compat.__all__})
RTOL = 1e-4
BY_NAME = {case.name: case for case in CASES}


def unpack(packed: dict[str, Any]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, shape in zip(packed["names"], packed["shapes"]):
        size = int(torch.Size(shape).numel())
        out[name] = packed["flat"][start : start + size].view(shape)
        start += size
    return out


def golden(name: str) -> dict[str, Any]:
    record: dict[str, Any] = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    state = record["state_dict"]
    record["state_dict"] = unpack(state) if "of" not in state else golden(state["of"])["state_dict"]
    for key in ("outputs", "grads"):
        record[key] = unpack(record[key])
    return record


def relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().cpu(), want.detach().cpu()
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def run_case(
    case: Case, record: dict[str, Any], square_banks: str | None, device: str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Tensor], nn.Module]:
    torch.manual_seed(0)
    module = case.build(NS)
    missing = module.load_state_dict(record["state_dict"], strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    if square_banks is not None:
        set_square_banks(module, square_banks)  # type: ignore[arg-type]
    module.eval().to(device)
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in record["inputs"].items()}
    wanted = [k.removeprefix("input.") for k in record["grads"] if k.startswith("input.")]
    for key in wanted:
        inputs[key] = inputs[key].clone().requires_grad_(True)
    outputs = case.run(NS, module, inputs)
    targets = {f"input.{k}": inputs[k] for k in wanted}
    targets.update({f"param.{k}": p for k, p in module.named_parameters()})
    loss = sum(grad_target(out) for out in outputs.values() if out.requires_grad)
    grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)  # type: ignore[arg-type]
    return (
        outputs,
        {k: g if g is not None else torch.zeros_like(t) for (k, t), g in zip(targets.items(), grads)},
        module,
    )


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_peer_checkpoint_loads_strictly_and_gives_the_peers_numbers(case: Case, device: str) -> None:
    record = golden(case.name)
    outputs, grads, module = run_case(case, record, case.square_banks, device)
    assert sorted(outputs) == sorted(record["outputs"])
    for name, want in record["outputs"].items():
        assert relative_error(outputs[name], want) < RTOL, (
            case.name,
            name,
            relative_error(outputs[name], want),
        )
    # the same parameter names as the peer's, and the same gradients for each
    assert sorted(grads) == sorted(record["grads"])
    for name, want in record["grads"].items():
        if want.abs().max() == 0:
            assert grads[name].abs().max() == 0, (case.name, name)
            continue
        assert relative_error(grads[name], want) < RTOL, (case.name, name, relative_error(grads[name], want))
    assert list(module.state_dict()) == list(record["state_dict"])  # same keys, same order


@pytest.mark.parametrize("case", [c for c in CASES if c.balanced], ids=lambda c: c.name)
def test_balanced_counts_need_the_square_bank_option(case: Case) -> None:
    """The peer computes x @ W for square banks at balanced counts: "as_peer"
    follows it call for call; the default ("linear", x @ W.T) gives other
    numbers and warns once that the checkpoint may need square_banks="bmm"."""
    record = golden(case.name)
    outputs, _, _ = run_case(case, record, "as_peer")
    for name, want in record["outputs"].items():
        assert relative_error(outputs[name], want) < RTOL, (case.name, name)
    with pytest.warns(SquareBankWarning, match="square_banks='bmm'") as caught:
        outputs, _, module = run_case(case, record, None)
    square = [m for m in module.modules() if isinstance(m, UntiedLinear) and m.input_dim == m.output_dim]
    assert 0 < len(caught) <= len(square)  # at most once per layer, however many calls
    assert max(relative_error(outputs[n], w) for n, w in record["outputs"].items()) > 1e-3


def test_unbalanced_counts_do_not_warn() -> None:
    record = golden("untied_mixed_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SquareBankWarning)
        run_case(BY_NAME["untied_mixed_attention"], record, None)


def test_bmm_mode_differs_at_unbalanced_counts() -> None:
    """ "bmm" is x @ W at every count: a checkpoint trained unbalanced needs "linear"."""
    record = golden("untied_linear_square")
    outputs, _, _ = run_case(BY_NAME["untied_linear_square"], record, "bmm")
    assert relative_error(outputs["out"], record["outputs"]["out"]) > 1e-3
    outputs, _, _ = run_case(BY_NAME["untied_linear_square"], record, "as_peer")
    assert relative_error(outputs["out"], record["outputs"]["out"]) < RTOL


def linear(din: int, dout: int, types: int = 2, **kwargs: Any) -> UntiedLinear:
    geometry = LinearProjectionConfig(input_dim=din, output_dim=dout, **kwargs)
    return UntiedLinear(UntiedLinearConfig(num_types=types, linear_projection=geometry))


def test_untied_linear_banks_are_real_parameters() -> None:
    layer = linear(4, 4, bias=False)
    assert [tuple(w.shape) for w in layer.weight] == [(4, 4), (4, 4)] and layer.bias is None
    with torch.no_grad():
        layer.weight[0].copy_(torch.eye(4))
    torch.nn.init.zeros_(layer.weight[1])
    x = torch.randn(1, 5, 4)
    out = layer(x, [TokenSpec(name="a_x", size=2), TokenSpec(name="b_x", size=3)])
    assert torch.equal(out[:, :2], x[:, :2]) and not out[:, 2:].any()
    out.sum().backward()
    assert all(w.grad is not None for w in layer.weight)
    assert "_extra_state" not in "".join(layer.state_dict())  # the peer's keys only


def test_banks_bind_by_position_and_domains_must_be_consecutive() -> None:
    layer = linear(3, 5, types=3)
    x = torch.randn(2, 4, 3)
    by_position = layer(x, [TokenSpec(name="wake_a", size=1), TokenSpec(name="surface_b", size=3)])
    with torch.no_grad():
        expected = torch.cat(
            [
                torch.nn.functional.linear(x[:, :1], layer.weight[0], layer.bias[0]),  # type: ignore[index]
                torch.nn.functional.linear(x[:, 1:], layer.weight[1], layer.bias[1]),
            ],
            dim=1,  # type: ignore[index]
        )
    assert torch.allclose(by_position, expected)
    with pytest.raises(ValueError, match="Domain 'a' is not consecutive"):
        layer(torch.randn(1, 3, 3), [TokenSpec(name=n, size=1) for n in ("a_x", "b_x", "a_y")])
    with pytest.raises(ValueError, match="4 domains .* num_types=3"):
        layer(torch.randn(1, 4, 3), [TokenSpec(name=n, size=1) for n in ("a", "b", "c", "d")])


def test_square_banks_option_is_checked() -> None:
    with pytest.raises(ValueError, match=r"square_banks must be one of \['linear', 'bmm', 'as_peer'\]"):
        set_square_banks(linear(4, 4), "transposed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square_banks must be one of"):
        UntiedLinear(
            UntiedLinearConfig(
                num_types=1, linear_projection=LinearProjectionConfig(input_dim=2, output_dim=2)
            ),
            square_banks="x",  # type: ignore[arg-type]
        )


def block(condition_dim: int | None = 4, init: str = "truncnormal002") -> UntiedTransformerBlock:
    config = TransformerBlockConfig(
        hidden_dim=8, num_heads=2, mlp_expansion_factor=2, condition_dim=condition_dim, init_weights=init
    )
    return UntiedTransformerBlock(UntiedTransformerBlockConfig(num_types=2, transformer_block=config))


def block_kwargs() -> dict[str, Any]:
    specs = [TokenSpec(name=n, size=s) for n, s in UNBALANCED.items()]
    return {
        "token_specs": specs,
        "attention_patterns": [AttentionPattern(list(UNBALANCED), ["surface_anchors"])],
    }


def test_a_fresh_conditioned_block_is_the_identity() -> None:
    """adaLN-Zero: the zero-initialised modulation closes both gates."""
    tb = block()
    assert not tb.norm1.elementwise_affine and tb.modulation is not None
    x = torch.randn(2, sum(UNBALANCED.values()), 8)
    out, cache = tb(x, condition=torch.randn(2, 4), attn_kwargs=block_kwargs())
    assert torch.equal(out, x) and cache is None


def test_identity_init_mode_keeps_the_peers_meaning() -> None:
    """ "truncnormal002-identity" zeros attention's output projection and the MLP's second linear."""
    from patternc.compat.noether import MixedAttention, MixedAttentionConfig, UpActDownMlp, UpActDownMLPConfig

    attn = MixedAttention(
        MixedAttentionConfig(hidden_dim=8, num_heads=2, init_weights="truncnormal002-identity")
    )
    assert not attn.proj.weight.any() and attn.q.weight.any()
    mlp = UpActDownMlp(UpActDownMLPConfig(input_dim=8, hidden_dim=16, init_weights="truncnormal002-identity"))
    assert not mlp.fc2.weight.any() and not mlp.fc2.bias.any()
    with pytest.raises(NotImplementedError, match="truncnormal002-identity"):
        linear(4, 4, init_weights="truncnormal002-identity")


def test_block_errors_name_what_is_missing() -> None:
    tb = block(condition_dim=None)
    x = torch.randn(2, sum(UNBALANCED.values()), 8)
    with pytest.raises(ValueError, match="'token_specs' key for UntiedTransformerBlock"):
        tb(x, attn_kwargs={})
    with pytest.raises(ValueError, match="not configured for conditioning"):
        tb(x, condition=torch.randn(2, 4), attn_kwargs=block_kwargs())
    with pytest.raises(
        ValueError, match=r"Number of domains in token_specs \(1\) must match num_types \(2\)"
    ):
        tb(x[:, :7], attn_kwargs={"token_specs": [TokenSpec(name="surface_anchors", size=7)]})
    with pytest.raises(ValueError, match="No conditioning vector provided"):
        block()(x, attn_kwargs=block_kwargs())
    with pytest.raises(ValueError, match="incorrect shape. Expected 4, got 3"):
        block()(x, condition=torch.randn(2, 3), attn_kwargs=block_kwargs())


def test_untied_attention_refuses_a_kv_cache_as_the_peer_does() -> None:
    attn = block(condition_dim=None).attention_block
    with pytest.raises(NotImplementedError, match="kv caching"):
        attn(
            torch.randn(1, 2, 8), [TokenSpec(name="a", size=2)], [AttentionPattern(["a"], ["a"])], kv_cache={}
        )


def test_mixed_attention_takes_a_compiled_plan_too() -> None:
    """The compat module is patternc's MixedAttention: a pattern file's plan runs in place of the list."""
    record = golden("mixed_attention")
    case = BY_NAME["mixed_attention"]
    module = case.build(NS)
    module.load_state_dict(record["state_dict"], strict=True)
    inp = record["inputs"]
    plan = patternc.compile(
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "surface_* -> surface_anchors, volume_anchors\n"
        "volume_* -> volume_anchors\n"
    ).patterns["default"]
    specs = [TokenSpec(name=n, size=s) for n, s in inp["sizes"].items()]
    out, _ = module(inp["x"], specs, plan, freqs=inp["freqs"])
    assert relative_error(out, record["outputs"]["plain"]) < RTOL


def test_peer_error_wording_for_pattern_lists() -> None:
    attn = compat.MixedAttention(compat.MixedAttentionConfig(hidden_dim=8, num_heads=2))
    x = torch.randn(1, 4, 8)
    specs = [TokenSpec(name="a_x", size=2), TokenSpec(name="b_x", size=2)]
    with pytest.raises(ValueError, match="set of query tokens must exactly match"):
        attn(x, specs, [AttentionPattern(["a_x"], ["a_x"])])
    with pytest.raises(ValueError, match="cannot be a query in multiple"):
        attn(x, specs, [AttentionPattern(["a_x", "b_x"], ["a_x"]), AttentionPattern(["a_x"], ["b_x"])])
    with pytest.raises(ValueError, match="Token specs total size 4 != tensor size 3"):
        attn(x[:, :3], specs, [AttentionPattern(["a_x", "b_x"], ["a_x"])])
    with pytest.raises(ValueError, match="RoPE usage mismatch"):
        attn(
            x,
            specs,
            [AttentionPattern(["a_x", "b_x"], ["a_x"])],
            freqs=torch.ones(1, 4, 2, dtype=torch.cfloat),
        )


def test_the_abupt_model_with_its_patterns_in_a_pattern_file() -> None:
    """The worked port's second step (docs/migrating.md): the physics blocks'
    anchor classes replaced by plain untied blocks reading the plans of
    examples/ab_upt.patc; the peer checkpoint loads after one key rename and
    gives the peer's predictions."""
    from noether_cases import ABUPT

    program = patternc.compile(Path(__file__).parent.parent / "examples" / "ab_upt.patc")
    plans = {"self": program["self_anchor"], "cross": program["cross_anchor"], "joint": program["joint"]}
    record = golden("abupt")
    model = ABUPT(NS, plans=plans).eval()
    # the anchor wrapper's level disappears: attention_block.mixed_attention.q -> attention_block.q
    rename = (".attention_block.mixed_attention.", ".attention_block.")
    state = {
        (k.replace(*rename) if k.startswith("physics_blocks") else k): v
        for k, v in record["state_dict"].items()
    }
    model.load_state_dict(state, strict=True)
    outputs = BY_NAME["abupt"].run(NS, model, record["inputs"])
    for name, want in record["outputs"].items():
        assert relative_error(outputs[name], want) < RTOL, name


def test_the_shim_imports_compat_under_the_peers_names(tmp_path: Path) -> None:
    """tests/golden/noether/peer_shim: the peer's import lines resolve to patternc.compat.noether
    (run in a subprocess: the name `noether` must not leak into this test process)."""
    import subprocess
    import sys

    shim = Path(__file__).parent / "golden" / "noether" / "peer_shim"
    script = (
        f"import sys; sys.path.insert(0, {str(shim)!r})\n"
        "from noether.modeling.modules.untied import UntiedLinear, _domain_group_sizes\n"
        "from noether.modeling.modules.layers.layer_scale import LayerScale\n"
        "from noether.core.schemas.modules.attention import TokenSpec\n"
        "import patternc.compat.noether as compat\n"
        "assert UntiedLinear is compat.UntiedLinear and LayerScale is compat.LayerScale\n"
        "assert _domain_group_sizes([TokenSpec(name='a_x', size=2), TokenSpec(name='b', size=1)]) == [2, 1]\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    ("sizes", "batch", "dtype", "bias", "batched"),
    [
        ([8, 8], 2, torch.float32, True, True),  # equal counts
        ([10, 9], 2, torch.float32, True, True),  # padding to 10 costs 20 / 19 <= 1.1
        ([10, 8], 2, torch.float32, True, False),  # 20 / 18 > 1.1: the loop
        ([7], 3, torch.float32, True, True),  # one domain
        ([2, 5], 1, torch.bfloat16, False, True),  # grouped_mm, batch of one, no bias
        ([2, 5], 2, torch.bfloat16, False, False),
        ([2, 5], 1, torch.bfloat16, True, False),  # grouped_mm takes no bias
    ],
)
def test_when_the_peer_takes_its_batched_path(
    sizes: list[int], batch: int, dtype: torch.dtype, bias: bool, batched: bool
) -> None:
    from patternc.compat.noether.modeling.modules.untied import peer_takes_bmm

    assert peer_takes_bmm(sizes, batch, dtype, torch.device("cpu"), bias) is batched


@pytest.mark.parametrize("implementation", ["loop", "dense", "batched"])
def test_every_patternc_executor_gives_the_peers_numbers(implementation: str) -> None:
    """``implementation`` (an extra config field, kept as the peer keeps extras) picks patternc's executor."""
    record = golden("mixed_attention")
    inp = record["inputs"]
    config = compat.MixedAttentionConfig(
        hidden_dim=16, num_heads=2, use_rope=True, implementation=implementation
    )
    module = compat.MixedAttention(config)
    module.load_state_dict(record["state_dict"], strict=True)
    assert module.config.implementation == implementation
    specs = [TokenSpec(name=n, size=s) for n, s in inp["sizes"].items()]
    patterns = [AttentionPattern(q, kv) for q, kv in inp["patterns"]]
    out, _ = module(inp["x"], specs, patterns, key_padding_mask=inp["mask"], freqs=inp["freqs"])
    assert relative_error(out, record["outputs"]["masked"]) < RTOL


NATIVE_CASES = [
    ("untied_transformer_block", None),
    ("untied_block_cross_anchor", "cross_anchor"),
    ("transformer_block_self_anchor", "self_anchor"),
    ("perceiver_block", None),
    ("untied_perceiver_block", None),
]


def native_outputs(
    name: str, pattern: str | None, block: nn.Module, inp: dict[str, Any]
) -> dict[str, Tensor]:
    """The golden case's call, written for the ``patternc.nn`` block."""
    untied = name.startswith("untied")
    specs = [patternc.TokenSpec(n, s) for n, s in inp["sizes"].items()]
    condition = inp["condition"]
    if "perceiver" in name:
        groups = specs if untied else None
        out = block(
            inp["q"], inp["kv"], groups, q_freqs=inp["q_freqs"], kv_freqs=inp["k_freqs"], condition=condition
        )
        cache = block.key_values(inp["kv"], inp["k_freqs"], condition=condition)  # type: ignore[operator]
        again = block(
            inp["q"], token_specs=groups, q_freqs=inp["q_freqs"], kv_cache=cache, condition=condition
        )
        return {"out": out, "from_cache": again, "cache.k": cache["k"], "cache.v": cache["v"]}
    if pattern is None:
        patterns: Any = [patternc.AttentionPattern(q, kv) for q, kv in inp["patterns"]]
    else:
        patterns = patternc.compile(Path(__file__).parent.parent / "examples" / "ab_upt.patc")[pattern]
    return {"out": block(inp["x"], specs, patterns, freqs=inp.get("freqs"), condition=condition)}


@pytest.mark.parametrize(("name", "pattern"), NATIVE_CASES)
def test_blocks_move_to_patterncs_own_modules_with_the_peers_numbers(name: str, pattern: str | None) -> None:
    from patternc.compat.noether.native import to_native

    record = golden(name)
    block = BY_NAME[name].build(NS)
    block.load_state_dict(record["state_dict"], strict=True)
    converted = to_native(block.eval(), types=["surface", "volume"] if name.startswith("untied") else None)
    assert type(converted).__module__ == "patternc.nn.blocks"
    outputs = native_outputs(name, pattern, converted, record["inputs"])
    for key, got in outputs.items():
        assert relative_error(got, record["outputs"][key]) < RTOL, (name, key)


def test_square_banks_that_mean_x_at_w_are_transposed_on_the_way() -> None:
    from patternc.compat.noether.native import to_native

    record = golden("untied_transformer_block")
    block = BY_NAME["untied_transformer_block"].build(NS)
    block.load_state_dict(record["state_dict"], strict=True)
    set_square_banks(block.eval(), "bmm")
    inp = record["inputs"]
    expected = BY_NAME["untied_transformer_block"].run(NS, block, inp)["out"]
    converted = to_native(block, types=["surface", "volume"], square_banks="bmm")
    got = native_outputs("untied_transformer_block", None, converted, inp)["out"]
    assert relative_error(got, expected) < RTOL
    assert relative_error(got, record["outputs"]["out"]) > 1e-3  # bmm really is another function here
    with pytest.raises(ValueError, match="'as_peer' depends on each call's counts"):
        to_native(block, types=["surface", "volume"], square_banks="as_peer")
    with pytest.raises(ValueError, match=r"needs types=\[...\]"):
        to_native(block)


def test_refusals_are_one_named_kind_and_the_peers_type() -> None:
    """What the peer refuses raises PeerRefusal, which is the peer's NotImplementedError."""
    from patternc.compat.noether.refusals import PeerRefusal

    assert issubclass(PeerRefusal, NotImplementedError)
    attn = block(condition_dim=None).attention_block
    with pytest.raises(PeerRefusal, match="kv caching"):
        attn(torch.randn(1, 2, 8), [TokenSpec(name="a", size=2)], [AttentionPattern(["a"], ["a"])], kv_cache={})
