"""Nothing crashes, nothing leaks: empty inputs, gradients that exist, NaN
containment, input checks whose messages name the fix, and located errors
at the compiler's limits."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, ROOT

import patternc
from patternc.compiler import MAX_NAMES, MAX_NESTING, MAX_RULES
from patternc.nn import PatternAttention

BACKENDS = ["batched", "loop", "dense", "flex", "varlen", "auto"]
AB = patternc.compile(EXAMPLES / "ab_upt.patc")
VLM = patternc.compile(EXAMPLES / "cookbook" / "vlm.patc").patterns["default"]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AB_SIZES = {"surface_anchors": 3, "surface_queries": 4, "volume_anchors": 3, "volume_queries": 4}


def make(plan: patternc.Plan, backend: str) -> PatternAttention:
    torch.manual_seed(0)
    return PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, implementation=backend), plan
    )


def run(module: PatternAttention, x: torch.Tensor, sizes: dict[str, int], **kw: object) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex/varlen on CPU run as batched
        out, _ = module(x, sizes, **kw)  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------- empty inputs, gradients


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("plan", "sizes", "batch"),
    [
        (AB["joint"], AB_SIZES, 0),  # empty batch
        (AB["joint"], dict.fromkeys(AB_SIZES, 0), 2),  # every group empty
        (VLM, {"registers": 0, "image": 0, "text": 0}, 3),
        (VLM, {"registers": 2, "image": 3, "text": 4}, 0),
        # every key group of a call empty: queries with nothing to attend to
        (
            AB["joint"],
            {"surface_anchors": 0, "surface_queries": 3, "volume_anchors": 0, "volume_queries": 2},
            2,
        ),
    ],
    ids=["batch-0", "groups-0", "vlm-groups-0", "vlm-batch-0", "keys-0"],
)
def test_empty_inputs_give_zeros_and_zero_gradients(
    plan: patternc.Plan, sizes: dict[str, int], batch: int, backend: str, padded: bool
) -> None:
    module = make(plan, backend)
    n = sum(sizes.values())
    x = torch.randn(batch, n, 8, requires_grad=True)
    mask = torch.ones(batch, n, dtype=torch.bool) if padded else None
    out = run(module, x, sizes, key_padding_mask=mask)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and module.qkv.weight.grad is not None, "gradients must exist (DDP)"
    if n and batch:  # no key: the attention output is zero, so only the output bias remains
        assert torch.allclose(out, module.proj.bias.expand_as(out), atol=1e-6)
        assert torch.count_nonzero(module.qkv.weight.grad) == 0


# ---------------------------------------------------------------- NaN containment


def _needs_its_kernel(backend: str, request: pytest.FixtureRequest) -> None:
    """flex's cases test its CPU kernel: skipped where torch cannot build it."""
    if backend == "flex":
        request.getfixturevalue("cpu_flex_kernel")


@pytest.mark.parametrize("backend", [*BACKENDS, "linear"])
def test_a_nan_reaches_only_the_queries_that_attend_to_it(
    backend: str, request: pytest.FixtureRequest
) -> None:
    _needs_its_kernel(backend, request)
    module = make(AB["self_anchor"], backend)
    x = torch.randn(2, 14, 8)
    x[0, 7 + 1] = float("nan")  # token 1 of volume_anchors, element 0 of the batch
    with torch.no_grad():  # flex runs its own kernel on CPU only without gradients
        out = run(module, x, AB_SIZES)
    poisoned = torch.isnan(out).any(-1)
    assert poisoned[0, 7:].all(), "the volume groups attend to volume_anchors"
    assert not poisoned[0, :7].any(), "the surface groups never attend to it"
    assert not poisoned[1].any(), "other batch elements are untouched"


@pytest.mark.parametrize("backend", [*BACKENDS, "linear"])
def test_padded_tokens_never_poison_anything(backend: str, request: pytest.FixtureRequest) -> None:
    _needs_its_kernel(backend, request)
    module = make(AB["joint"], backend)
    x = torch.randn(2, 14, 8)
    x[:, 5] = float("inf")  # a padded surface query, filled with garbage
    x[1, 13] = float("nan")
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[:, 5] = False
    mask[1, 13] = False
    with torch.no_grad():
        out = run(module, x, AB_SIZES, key_padding_mask=mask)
    real = out[mask]
    assert torch.isfinite(real).all()


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_one_launch_backends_contain_a_nan(backend: str, request: pytest.FixtureRequest) -> None:
    """dense and flex run one softmax or kernel over every key: the NaN must still stay in its group."""
    _needs_its_kernel(backend, request)
    plan = patternc.compile("groups a b\na -> a\nb -> b\n").patterns["default"]
    module = make(plan, backend)
    x = torch.randn(1, 6, 8)
    x[0, 4] = float("nan")
    with torch.no_grad():
        poisoned = torch.isnan(run(module, x, {"a": 3, "b": 3})).any(-1)[0]
    assert poisoned.tolist() == [False, False, False, True, True, True]


WHOLE_BLOCKS = {"surface_anchors": 128, "surface_queries": 256, "volume_anchors": 128, "volume_queries": 128}
"""AB-UPT in whole 128-token blocks: no block mixes groups, so flex runs unguarded."""


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("k", float("nan")),
        ("v", float("nan")),
        ("both", float("nan")),
        ("v", float("inf")),
        ("both", float("inf")),
    ],
)
@pytest.mark.parametrize(
    ("device", "sizes", "guard"),
    [
        ("cpu", AB_SIZES, "poison"),
        ("cpu", WHOLE_BLOCKS, "poison"),  # Inductor's CPU kernel drops NaN scores: guarded on CPU
        pytest.param("cuda", AB_SIZES, "keys", marks=GPU),
        pytest.param("cuda", WHOLE_BLOCKS, "none", marks=GPU),
    ],
)
def test_flex_contains_a_bad_key_or_value_like_separate_calls(
    where: str,
    value: float,
    device: str,
    sizes: dict[str, int],
    guard: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """A non-finite value in K only, V only, or both, on one token: flex's one
    kernel poisons exactly the queries that separate SDPA calls (batched) do,
    with its guard where blocks mix groups (and on CPU), with the kernel
    alone where they do not. (An infinite key alone is left out: SDPA then
    poisons only the queries whose score with it is +inf, flex every query
    that reads it.)"""
    from patternc.nn.executors import EXECUTORS, flex
    from patternc.nn.executors.common import AttentionInputs
    from patternc.nn.schedule import schedule_for

    if device == "cpu":
        request.getfixturevalue("cpu_flex_kernel")
    paths: list[str] = []
    attend_fn = flex._attend_fn

    def recording(guard: flex.Guard, traced: bool) -> object:
        paths.append(guard)
        return attend_fn(guard, traced)

    monkeypatch.setattr(flex, "_attend_fn", recording)
    plan = AB["joint"] if where == "both" else AB["self_anchor"]
    layout = schedule_for(plan.token_specs(sizes), plan)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, layout.n_tokens, 2, 16, generator=gen).to(device) for _ in range(3))
    bad = sizes["surface_anchors"] + sizes["surface_queries"] + 1  # token 1 of volume_anchors
    for t in {"k": [k], "v": [v], "both": [k, v]}[where]:
        t[0, bad, 1, 3] = value
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    with torch.no_grad():
        expected = ~torch.isfinite(EXECUTORS["batched"](inputs)).all(-1)
        got = ~torch.isfinite(EXECUTORS["flex"](inputs)).all(-1)
    assert paths == [guard]
    assert expected.any(), "the bad token reaches someone"
    assert torch.equal(got, expected), (got.nonzero().tolist(), expected.nonzero().tolist())


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(1, 14, 16), "x has hidden size 16 but this layer was built with hidden_dim=8"),
        (
            torch.randn(1, 14, 8, dtype=torch.float64),
            "x is torch.float64 but the layer's weights are torch.float32",
        ),
        (torch.randn(1, 14, 8, device="meta"), "x is on meta but the layer's weights are on cpu"),
    ],
)
def test_wrong_inputs_name_the_fix(x: torch.Tensor, message: str) -> None:
    module = make(AB["joint"], "batched")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        module(x, AB_SIZES)


def test_sizes_of_the_wrong_type() -> None:
    module = make(AB["joint"], "batched")
    with pytest.raises(TypeError, match=r"sizes must be a \{group: size\} dict or a list of TokenSpec"):
        module(torch.randn(1, 12, 8), [3, 4, 5])  # type: ignore[arg-type]
    with pytest.raises(patternc.PatternError) as info:
        module(torch.randn(1, 14, 8), {**AB_SIZES, "surface_anchors": 2.5})  # type: ignore[dict-item]
    assert info.value.diagnostics[0].code == "E402"


# ---------------------------------------------------------------- compiler limits and the CLI


@pytest.mark.parametrize(
    ("source", "code", "line"),
    [
        ("groups a b\na, b -> " + "(" * (MAX_NESTING + 1) + "a" + ")" * (MAX_NESTING + 1) + "\n", "E005", 2),
        ("groups a\n" + "a -> a\n" * (MAX_RULES + 1), "E007", MAX_RULES + 2),
        ("groups " + " ".join(f"g{i}" for i in range(MAX_NAMES + 1)) + "\n* -> *\n", "E008", 1),
    ],
    ids=["nesting", "rules", "names"],
)
def test_limits_are_located_errors(source: str, code: str, line: int) -> None:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source)
    (diag,) = info.value.diagnostics
    assert diag.code == code and diag.line == line


def test_a_long_flat_list_is_not_nesting() -> None:
    groups = [f"g{i}" for i in range(2000)]
    program = patternc.compile(f"groups {' '.join(groups)}\n{', '.join(groups)} -> g0  # noqa\n")
    assert program.patterns["default"].calls[0].queries == tuple(groups)


def test_cli_reports_binding_errors_as_diagnostics(tmp_path: Path) -> None:
    path = tmp_path / "fam.pc"
    path.write_text("groups a doc*\na -> doc*\ndoc* -> self\n")
    for extra in ([], ["--format", "json"], ["--mask", "-"]):
        result = subprocess.run(
            [sys.executable, "-m", "patternc", "compile", str(path), "--sizes", "a=3", *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 1, extra
        assert "Traceback" not in result.stderr
        assert "error[E406]" in result.stderr


@GPU
@pytest.mark.parametrize("backend", ["batched", "flex", "varlen", "auto"])
def test_gpu_empty_inputs_and_nan_containment(backend: str) -> None:
    """The GPU kernels (flex compiled, varlen's FlashAttention) in bf16."""
    module = make(AB["self_anchor"], backend).cuda()
    dtype = torch.bfloat16
    for sizes, batch in ((AB_SIZES, 0), (dict.fromkeys(AB_SIZES, 0), 2)):
        x = torch.randn(batch, sum(sizes.values()), 8, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype):
            out = run(module, x, sizes)
        out.float().sum().backward()
        assert out.shape == x.shape and x.grad is not None
    sizes = {g: 37 * s for g, s in AB_SIZES.items()}  # several blocks, none aligned
    x = torch.randn(2, sum(sizes.values()), 8, device="cuda")
    volume_start = sizes["surface_anchors"] + sizes["surface_queries"]
    x[0, volume_start + 5] = float("nan")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        poisoned = torch.isnan(run(module, x, sizes)).any(-1)
    assert poisoned[0, volume_start:].all() and not poisoned[0, :volume_start].any()
    assert not poisoned[1].any()
