"""Modifiers as one band on the diagonal: ``back``, ``ahead``, ``dilate`` and
``across`` beside ``causal`` and ``window``. Every CPU executor against a
float64 reference written from the language's definition
(:func:`reference.language_mask`), forward and backward; attention-gym's
mask_mods cell by cell; block classes against brute force; the exports exact
or refused with their reason; the parser's messages."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from reference import language_mask, reference_pattern_attention, relative_error

import patternc
from patternc import MixedAttentionConfig, PatternError
from patternc.export import NotExpressible, flashmask_bounds, magi_slices, xformers_mask
from patternc.fmt import format_source
from patternc.lower.blocks import EMPTY, FULL, PARTIAL, block_classes
from patternc.lower.varlen import varlen_launches
from patternc.modifiers import Modifiers, allowed_pairs
from patternc.nn import PatternAttention
from patternc.nn.flexmask import FlexTables

ASYMMETRIC = "groups a\na -> a [back 3, ahead 1]"
CAUSAL_BACK_DILATED = "groups a\na -> a [causal, back 5, dilate 2]"
WINDOW_DILATED = "groups a\na -> a [window 4, dilate 3]"
MID_SINK = "groups t1 sink t2\nt1, t2 -> sink, (t1, t2)[causal, across, back 4]\nsink -> sink"
MIXED = (
    "groups a b c\n"
    "a -> a[ahead 2], b[across, back 1, ahead 5, dilate 2]\n"
    "b -> a[causal, across, dilate 3], b, c[across, back 2]\n"
    "c -> c[causal, across]\n"
)
LATER_KEYS = "groups a b\na -> a, b[causal, across]\nb -> b"  # a's queries precede every b key
SOURCES = {
    "asymmetric": ASYMMETRIC,
    "causal_back_dilated": CAUSAL_BACK_DILATED,
    "window_dilated": WINDOW_DILATED,
    "mid_sink": MID_SINK,
    "mixed": MIXED,
    "later_keys": LATER_KEYS,
}
SIZES = {
    "asymmetric": [{"a": 1}, {"a": 2}, {"a": 13}],
    "causal_back_dilated": [{"a": 3}, {"a": 17}],
    "window_dilated": [{"a": 2}, {"a": 11}],
    "mid_sink": [{"t1": 5, "sink": 1, "t2": 7}, {"t1": 0, "sink": 2, "t2": 3}, {"t1": 9, "sink": 1, "t2": 1}],
    "mixed": [{"a": 4, "b": 7, "c": 3}, {"a": 1, "b": 1, "c": 9}, {"a": 6, "b": 0, "c": 5}],
    "later_keys": [{"a": 5, "b": 4}],
}
CASES = [(name, sizes) for name, all_sizes in SIZES.items() for sizes in all_sizes]
IDS = [f"{name}-{'-'.join(str(n) for n in sizes.values())}" for name, sizes in CASES]
BACKENDS = ["dense", "loop", "batched", "flex", "varlen", "auto"]


def plan_of(source: str) -> patternc.Plan:
    return patternc.compile(source).patterns["default"]


def definition_mask(source: str, sizes: dict[str, int]) -> torch.Tensor:
    return language_mask(plan_of(source), sizes)


@pytest.mark.parametrize(("name", "sizes"), CASES, ids=IDS)
def test_layout_mask_and_pair_count_follow_the_definition(name: str, sizes: dict[str, int]) -> None:
    layout = plan_of(SOURCES[name]).layout(sizes)
    expected = definition_mask(SOURCES[name], sizes)
    assert torch.equal(layout.dense_mask(), expected)
    assert layout.allowed_entries == int(expected.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "sizes"), CASES, ids=IDS)
def test_every_executor_matches_the_float64_reference(backend: str, name: str, sizes: dict[str, int]) -> None:
    torch.manual_seed(3)
    config = MixedAttentionConfig(hidden_dim=12, num_heads=2, bias=True, init_weights="truncnormal002")
    plan = plan_of(SOURCES[name])
    attn = PatternAttention(config, plan, backend=backend).double()  # type: ignore[arg-type]
    x = torch.randn(2, sum(sizes.values()), 12, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # varlen and flex on the CPU may run as batched, and say so
        out, _ = attn(x, sizes)
    reference = reference_pattern_attention(attn, x, plan, sizes)
    assert relative_error(out, reference) < 1e-10
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    assert relative_error(grad, expected) < 1e-10


@pytest.mark.parametrize(("name", "sizes"), CASES, ids=IDS)
def test_flex_mask_mod_and_blocks_are_exact(name: str, sizes: dict[str, int]) -> None:
    layout = plan_of(SOURCES[name]).layout(sizes)
    expected = definition_mask(SOURCES[name], sizes)
    n = layout.n_tokens
    for block in (2, 3, 128):
        tables = FlexTables.build(layout, {}, "cpu", block)
        i, j = torch.arange(tables.q_len)[:, None], torch.arange(tables.kv_len)[None, :]
        for lookups in (False, True):
            got = tables.mask_mod(lookups=lookups)(torch.tensor(0), torch.tensor(0), i, j)
            assert torch.equal(got[:n, :n], expected), (block, lookups)
        padded = torch.zeros(tables.q_len, tables.kv_len, dtype=torch.bool)
        padded[:n, :n] = expected
        cells = padded.view(tables.q_len // block, block, tables.kv_len // block, block)
        assert torch.equal(tables.partial | tables.full, cells.any(3).any(1))
        whole = n // block  # padded blocks are never full
        assert torch.equal(tables.full[:whole, :whole], cells.all(3).all(1)[:whole, :whole])


def test_flex_runs_the_band_forward_on_the_cpu() -> None:
    """The flex kernel itself (not the batched fallback) under no_grad, with a dilated band across groups."""
    torch.manual_seed(0)
    config = MixedAttentionConfig(hidden_dim=16, num_heads=2)
    plan = plan_of(MIXED)
    sizes = {"a": 70, "b": 133, "c": 61}
    attn = PatternAttention(config, plan, backend="flex")
    x = torch.randn(1, sum(sizes.values()), 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = attn(x, sizes)
    assert not [w for w in caught if "batched" in str(w.message)]  # a fallback would say so
    reference = reference_pattern_attention(attn, x.double(), plan, sizes)
    assert relative_error(out, reference) < 1e-5


def _random_source(rng: random.Random) -> str:
    groups = ["g0", "g1", "g2"]
    lines = ["groups " + " ".join(groups)]
    for q in groups:
        keys = []
        for k in rng.sample(groups, rng.randint(1, 3)):
            parts = []
            if rng.random() < 0.4:
                parts.append("causal")
            if rng.random() < 0.3:
                parts.append(f"window {rng.randint(1, 9)}")
            else:
                if rng.random() < 0.5:
                    parts.append(f"back {rng.randint(0, 9)}")
                if rng.random() < 0.5:
                    parts.append(f"ahead {rng.randint(0, 9)}")
            if rng.random() < 0.4:
                parts.append(f"dilate {rng.randint(1, 4)}")
            if rng.random() < 0.5:
                parts.append("across")
            keys.append(k + (f"[{', '.join(parts)}]" if parts else ""))
        lines.append(f"{q} -> {', '.join(keys)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(12))
def test_block_classes_and_counts_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    source = _random_source(rng)
    sizes = {g: rng.randint(0, 23) for g in ("g0", "g1", "g2")}
    layout = plan_of(source).layout(sizes)
    expected = definition_mask(source, sizes)
    assert layout.allowed_entries == int(expected.sum()), source
    block = rng.choice([1, 2, 3, 5, 7])
    n = layout.n_tokens
    classes = block_classes(layout, block).classes
    for r, row in enumerate(classes):
        for c, cls in enumerate(row):
            cell = expected[r * block : (r + 1) * block, c * block : (c + 1) * block]
            padded = (r + 1) * block > n or (c + 1) * block > n
            want = EMPTY if not cell.any() else (FULL if cell.all() and not padded else PARTIAL)
            if padded and cell.any() and cell.all():
                want = cls if cls in (FULL, PARTIAL) else PARTIAL  # padding: block_classes pads with nothing
            assert cls == want, (source, sizes, block, r, c)


def test_allowed_pairs_counts_shifted_and_dilated_bands() -> None:
    rng = random.Random(7)
    for _ in range(300):
        mods = Modifiers(
            causal=rng.random() < 0.3,
            back=rng.choice([None, rng.randint(0, 8)]),
            ahead=rng.choice([None, rng.randint(0, 8)]),
            dilation=rng.randint(1, 4),
            across=rng.random() < 0.5,
        )
        n_q, n_k, shift = rng.randint(0, 12), rng.randint(0, 12), rng.randint(-15, 15)
        low, high, step = mods.band()
        brute = sum(
            1
            for i in range(n_q)
            for j in range(n_k)
            for d in [j - i + (shift if mods.across else 0)]
            if (low is None or d >= low) and (high is None or d <= high) and d % step == 0
        )
        assert allowed_pairs(n_q, n_k, mods, shift) == brute, (mods, n_q, n_k, shift)


# ---------------------------------------------------------------- attention-gym


def _gym_mask(mask_mod: object, n: int) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.tensor(0)
    return mask_mod(zero, zero, i, j).expand(n, n)  # type: ignore[operator, no-any-return]


@pytest.mark.parametrize("n", [1, 5, 17, 40])
@pytest.mark.parametrize("size", [0, 1, 3, 8])
def test_attention_gym_sliding_window_is_causal_back(n: int, size: int) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    ours = plan_of(f"groups a\na -> a [causal, back {size}]").layout({"a": n}).dense_mask()
    assert torch.equal(ours, _gym_mask(masks.generate_sliding_window(size), n))
    if size:  # the off-by-one: `window N` is one key shorter than attention-gym's N
        window = plan_of(f"groups a\na -> a [causal, window {size}]").layout({"a": n}).dense_mask()
        assert torch.equal(window, _gym_mask(masks.generate_sliding_window(size - 1), n))
    assert torch.equal(
        plan_of("groups a\na -> a [causal]").layout({"a": n}).dense_mask(), _gym_mask(masks.causal_mask, n)
    )


@pytest.mark.parametrize(("size", "dilation", "n"), [(3, 2, 11), (4, 3, 20), (1, 1, 6), (6, 4, 9)])
def test_attention_gym_dilated_sliding_window(size: int, dilation: int, n: int) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    expected = _gym_mask(masks.generate_dilated_sliding_window(size, dilation), n)
    for modifiers in (f"back {size}, ahead {size}, dilate {dilation}", f"window {size + 1}, dilate {dilation}"):
        ours = plan_of(f"groups a\na -> a [{modifiers}]").layout({"a": n}).dense_mask()
        assert torch.equal(ours, expected), modifiers


@pytest.mark.parametrize(("before", "after", "size"), [(7, 9, 2), (1, 12, 4), (10, 0, 3), (5, 5, 0)])
def test_attention_gym_global_token_mid_sequence(before: int, after: int, size: int) -> None:
    """Longformer: a global token at any place, and a window that runs over it."""
    masks = pytest.importorskip("attn_gym.masks")
    source = (
        "groups left global right\n"
        f"left, right -> global, (left, right)[across, back {size}, ahead {size}]\n"
        "global -> *\n"
    )
    sizes = {"left": before, "global": 1, "right": after}
    n = before + 1 + after
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[before] = True
    expected = _gym_mask(masks.generate_global_sliding_window(size, is_global), n)
    assert torch.equal(plan_of(source).layout(sizes).dense_mask(), expected)


# ---------------------------------------------------------------- exports


def test_interval_exports_are_exact_for_asymmetric_and_across_bands() -> None:
    for name, sizes in [("asymmetric", {"a": 13}), ("mid_sink", {"t1": 5, "sink": 1, "t2": 7})]:
        layout = plan_of(SOURCES[name]).layout(sizes)
        expected = definition_mask(SOURCES[name], sizes)
        n = layout.n_tokens
        from_magi = torch.zeros(n, n, dtype=torch.bool)
        for s in magi_slices(layout):
            (qa, qb), (ka, kb) = s.q_range, s.k_range
            i, j = torch.arange(qa, qb)[:, None], torch.arange(ka, kb)[None, :]
            # MagiAttention's kinds, bottom-right aligned causal and top-left aligned inverse causal
            cell = torch.ones(qb - qa, kb - ka, dtype=torch.bool)
            if s.mask_type in ("CAUSAL", "BICAUSAL"):
                cell &= j - ka <= i - qa + (kb - ka) - (qb - qa)
            if s.mask_type in ("INVCAUSAL", "BICAUSAL"):
                cell &= j - ka >= i - qa
            from_magi[qa:qb, ka:kb] |= cell
        assert torch.equal(from_magi, expected), name
        if name == "mid_sink":  # the sink's row sits between the text rows that see a text key
            with pytest.raises(NotExpressible, match="key 2 is hidden from more than one run of queries below"):
                flashmask_bounds(layout)
            continue
        bounds = flashmask_bounds(layout)
        rows = torch.arange(n)[:, None]
        masked = ((rows >= torch.tensor(bounds.lts)) & (rows < torch.tensor(bounds.lte))) | (
            (rows >= torch.tensor(bounds.uts)) & (rows < torch.tensor(bounds.ute))
        )
        assert torch.equal(~masked, expected), name


def test_exports_refuse_dilation_with_the_reason() -> None:
    layout = plan_of(CAUSAL_BACK_DILATED).layout({"a": 9})
    for export in (magi_slices, flashmask_bounds):
        with pytest.raises(NotExpressible, match=r"\[causal, back 5, dilate 2\] keeps every 2th key: the keys"):
            export(layout)
    with pytest.raises(NotExpressible, match=r"keeps every 2th key; xformers' local masks keep them all"):
        xformers_mask(layout)
    with pytest.raises(NotExpressible, match=r"window cannot skip keys"):
        varlen_launches(layout)


def test_xformers_and_varlen_say_a_causal_back_band() -> None:
    layout = plan_of("groups doc*\ndoc* -> self [causal, back 3]").layout({"doc0": 6, "doc1": 4})
    mask = xformers_mask(layout)
    assert (mask.kind, mask.window_size) == ("BlockDiagonalCausalLocalAttentionMask", 4)
    (launch,) = varlen_launches(plan_of(ASYMMETRIC).layout({"a": 10}))
    assert launch.window == (3, 1)
    with pytest.raises(NotExpressible, match=r"\[ahead 1\] without \[causal\]"):
        xformers_mask(plan_of("groups a\na -> a [ahead 1]").layout({"a": 4}))
    refused = plan_of("groups a b\na -> b[causal, across]\nb -> b").layout({"a": 3, "b": 3})
    with pytest.raises(NotExpressible, match=r"between groups at different places"):
        varlen_launches(refused)


def test_across_refuses_keys_from_the_kv_cache() -> None:
    plan = plan_of("groups past now\npast -> past\nnow -> past[causal, across], now[causal]")
    with pytest.raises(PatternError, match=r"`past` is read from a KV cache .* under \[causal, across\]") as info:
        plan.layout({"past": None, "now": 4})
    assert "drop `across`" in (info.value.diagnostics[0].hint or "")


# ---------------------------------------------------------------- the language


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("[ahead 0]", "[causal]"),
        ("[causal, ahead 4]", "[causal]"),
        ("[ahead 0, back 3]", "[causal, back 3]"),
        ("[dilate 1, causal]", "[causal]"),
        ("[across, back 2, ahead 1, dilate 2]", "[back 2, ahead 1, dilate 2, across]"),
        ("[across]", ""),
        ("[window 4, causal, across]", "[causal, window 4, across]"),
    ],
)
def test_lists_print_canonically_and_fmt_round_trips(written: str, canonical: str) -> None:
    plan = plan_of(f"groups a b\na -> a, b{written}\nb -> b")
    (rule, _) = plan.rules
    assert rule.keys[1].modifiers.text() == canonical
    formatted = format_source(f"groups a b\na -> a, b{written}\nb -> b\n")
    assert format_source(formatted) == formatted
    again = plan_of(formatted)
    assert again.rules[0].keys[1].modifiers == rule.keys[1].modifiers


def test_band_and_tighten() -> None:
    assert Modifiers(causal=True, window=4).band() == (-3, 0, 1)
    assert Modifiers(back=3, ahead=1, dilation=2).band() == (-3, 1, 2)
    assert Modifiers(window=4).tighten(Modifiers(back=2, dilation=3)) == Modifiers(back=2, ahead=3, dilation=3)
    assert Modifiers(causal=True).tighten(Modifiers(window=5)) == Modifiers(causal=True, window=5)
    assert Modifiers(back=1, across=True).tighten(Modifiers()) == Modifiers(back=1, across=True)
    with pytest.raises(ValueError, match="one counts positions across groups and the other within"):
        Modifiers(back=1, across=True).tighten(Modifiers(causal=True))
    with pytest.raises(ValueError, match="window beside back or ahead"):
        Modifiers(window=3, back=1)
    assert Modifiers(back=2, dilation=2, across=True).to_dict() == {
        "causal": False, "window": None, "back": 2, "dilation": 2, "across": True,
    }  # fmt: skip
    assert Modifiers(causal=True).to_dict() == {"causal": True, "window": None}


@pytest.mark.parametrize(
    ("modifiers", "code", "message", "hint"),
    [
        ("[back]", "E021", "`back` needs a number of tokens", "e.g. `[back 255]`"),
        ("[ahead -1]", "E021", "`ahead` must be at least 0, got -1", "at most R keys ahead"),
        ("[back 2.5]", "E021", "`back` needs a whole number of tokens, got `2.5`", "e.g. `[back 255]`"),
        ("[dilate 0]", "E021", "`dilate` must be at least 1, got 0", "`dilate 1` keeps them all"),
        ("[dilate]", "E021", "`dilate` needs a step", "e.g. `[dilate 2]`"),
        ("[dilate two]", "E021", "`dilate` needs a whole-number step, got `two`", "e.g. `[dilate 2]`"),
        ("[across 3]", "E021", "`across` takes no argument", "write `[across]`"),
        ("[back 2, back 2]", "E022", "`back` given twice", "give each modifier once"),
        ("[ahead 2, ahead 5]", "E022", "two `ahead` values (2 and 5)", "keep one `ahead N`"),
        ("[dilate 2, dilate 3]", "E022", "two dilations (2 and 3)", "keep one `dilate N`"),
        ("[across, across]", "E022", "`across` given twice", "give each modifier once"),
        ("[window 4, back 2]", "E023", "`window 4` and `back 2` in one list", "`window 4` is `back 3, ahead 3`"),
        ("[ahead 1, window 3]", "E023", "`window 3` and `ahead 1` in one list", "or `window N` alone"),
        ("[behind 3]", "E020", "unknown modifier `behind`", "`back L`"),
        ("[dilute 2]", "E020", "unknown modifier `dilute`", "did you mean `dilate`?"),
    ],
)
def test_band_errors_have_a_message_and_a_hint(modifiers: str, code: str, message: str, hint: str) -> None:
    with pytest.raises(PatternError) as info:
        patternc.compile(f"groups a\na -> a {modifiers}\n")
    (diag,) = info.value.diagnostics
    assert diag.code == code and message in diag.message
    assert diag.hint is not None and hint in diag.hint
    assert diag.span is not None


def test_a_rule_modifier_across_groups_is_not_warned_about() -> None:
    """W102 warns that positions restart per group; under `across` they do not."""
    assert patternc.compile("groups a b\na, b -> a, b [causal, across]").warnings == ()
    (warning,) = patternc.compile("groups a b\na, b -> a, b [causal]").warnings
    assert warning.code == "W102"
