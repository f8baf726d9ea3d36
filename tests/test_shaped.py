"""Groups declared with a shape (``groups image[16, 16]``) and token-level
neighbourhoods over it (``image -> image[kernel 7]``, ``[near 1]``): exact
against attention-gym's NATTEN and sliding-tile masks and against a
reference written from NATTEN's definition, on every executor, with the
checks' messages."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
from reference import language_mask, masked_attention, relative_error
from test_flex import make

import patternc
from patternc import PatternError

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plan_of(source: str) -> patternc.Plan:
    return patternc.compile(source).patterns["default"]


def grid(mask_mod: MaskMod, n: int) -> torch.Tensor:
    """``mask_mod`` on every (query, key) index, by FlexAttention's ``create_mask``."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(mask_mod, None, None, n, n, device="cpu")[0, 0].bool()


def neighbourhood(shape: Sequence[int], kind: str, sizes: Sequence[int]) -> torch.Tensor:
    """``[N, N]`` bool written from the definitions, one coordinate tuple at a
    time (row-major): ``near s`` allows ``|k - q| <= s`` on every axis;
    ``kernel s`` the ``s`` coordinates from ``clamp(q - s // 2, 0, n - s)``
    (NATTEN's window, its centre kept ``s // 2`` from the edges)."""
    cells = list(itertools.product(*(range(n) for n in shape)))
    out = torch.zeros(len(cells), len(cells), dtype=torch.bool)
    for i, q in enumerate(cells):
        for j, k in enumerate(cells):
            ok = True
            for axis, (n, s) in enumerate(zip(shape, sizes)):
                if kind == "near":
                    ok = ok and abs(k[axis] - q[axis]) <= s
                else:
                    lo = min(max(q[axis] - s // 2, 0), n - s)
                    ok = ok and lo <= k[axis] < lo + s
            out[i, j] = ok
    return out


def assert_forward_and_backward(
    plan: patternc.Plan, impl: str, sizes: dict[str, int], mask: torch.Tensor
) -> None:
    """Output and input gradient of ``impl`` against the float64 reference under ``mask``."""
    module = make(plan, impl)
    x = torch.randn(2, sum(sizes.values()), 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # varlen and flex say they run as batched on the CPU
        out, _ = module(x, sizes)
    x64 = x.detach().double().requires_grad_()
    ref = masked_attention(module, x64, mask)
    assert relative_error(out, ref) < 1e-5
    weight = torch.randn_like(ref)
    (out * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    assert x.grad is not None and x64.grad is not None
    assert relative_error(x.grad, x64.grad) < 1e-5


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(("side", "kernel"), [(5, 3), (7, 5), (4, 3), (6, 1), (3, 3)])
def test_kernel_matches_natten(side: int, kernel: int) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    plan = plan_of(f"groups image[{side}, {side}]\nimage -> image[kernel {kernel}]")
    mask_mod = masks.generate_natten(side, side, kernel, kernel)
    n = side * side
    assert torch.equal(plan.layout({"image": n}).dense_mask(), grid(mask_mod, n))


@pytest.mark.parametrize(
    ("shape", "kind", "sizes"),
    [((7, 9), "kernel", (3, 5)), ((7, 9), "kernel", (7, 2)), ((5, 8), "near", (1, 2)),
     ((3, 5, 6), "kernel", (3, 3, 3)), ((3, 5, 6), "kernel", (1, 5, 4)), ((3, 5, 6), "near", (0, 1, 2)),
     ((11,), "kernel", (4,)), ((2, 3, 2, 3), "kernel", (2, 1, 2, 3))],
)  # fmt: skip
def test_neighbourhoods_match_their_definition(
    shape: tuple[int, ...], kind: str, sizes: tuple[int, ...]
) -> None:
    """Odd and non-square shapes in 1 to 4 axes (attention-gym's NATTEN is
    written for square canvases: its rows are clamped by the width)."""
    written = " ".join(map(str, sizes)) if len(set(sizes)) > 1 else str(sizes[0])
    plan = plan_of(f"groups text image{list(shape)}\ntext -> *\nimage -> text, image[{kind} {written}]")
    n = math.prod(shape)
    layout = plan.layout({"text": 3, "image": n})
    mask = layout.dense_mask()
    assert torch.equal(mask[3:, 3:], neighbourhood(shape, kind, sizes))
    assert mask[:3].all() and mask[3:, :3].all()
    assert layout.calls[1].allowed_entries == int(mask[3:].sum())


@pytest.mark.parametrize(
    ("tile", "canvas", "kernel"), [((2, 2), (5, 4), 3), ((1, 3), (4, 4), 2), ((2, 3), (3, 5), 3)]
)
def test_sliding_tiles_match_attention_gym(
    tile: tuple[int, int], canvas: tuple[int, int], kernel: int
) -> None:
    """STA lays tokens out tile by tile: the shape is (tile rows, tile
    columns, rows in a tile, columns in a tile), the kernel spans whole tiles."""
    masks = pytest.importorskip("attn_gym.masks")
    (th, tw), (rows, cols) = tile, canvas
    plan = plan_of(
        f"groups video[{rows}, {cols}, {th}, {tw}] text\n"
        f"video -> video[kernel {kernel} {kernel} {th} {tw}], text\ntext -> *"
    )
    n = rows * cols * th * tw
    mask_mod = masks.generate_sta_mask_mod_2d(
        (rows * th, cols * tw), (kernel * th, kernel * tw), tile, text_seq_len=2
    )
    assert torch.equal(plan.layout({"video": n, "text": 2}).dense_mask(), grid(mask_mod, n + 2))


def test_sliding_tiles_in_3d_match_attention_gym() -> None:
    masks = pytest.importorskip("attn_gym.masks")
    tile, canvas, kernel = (1, 2, 2), (3, 3, 4), 3
    shape = ", ".join(map(str, (*canvas, *tile)))
    plan = plan_of(f"groups video[{shape}] text\nvideo -> video[kernel 3 3 3 1 2 2], text\ntext -> *")
    n = math.prod(canvas) * math.prod(tile)
    mask_mod = masks.generate_sta_mask_mod_3d(
        tuple(c * t for c, t in zip(canvas, tile)), tuple(kernel * t for t in tile), tile, text_seq_len=2
    )
    assert torch.equal(plan.layout({"video": n, "text": 2}).dense_mask(), grid(mask_mod, n + 2))


@pytest.mark.parametrize(
    ("source", "sizes", "block"),
    [("groups text video[3, 5, 6]\ntext -> *\nvideo -> text, video[kernel 1 3 3]", {"text": 5, "video": 90}, 8),
     ("groups video[5, 4, 4]\nvideo -> video[kernel 3 4 4]", {"video": 80}, 16),
     ("groups video[5, 4, 4]\nvideo -> video[near 1 0 4]", {"video": 80}, 4)],
)  # fmt: skip
def test_block_classes_are_sound(source: str, sizes: dict[str, int], block: int) -> None:
    """Every block the classes call empty holds no allowed pair, every block
    called full holds only allowed pairs; where a block holds whole frames
    (or rows) the classes are exact."""
    from patternc.lower.blocks import EMPTY, FULL, PARTIAL, block_classes

    layout = plan_of(source).layout(sizes)
    mask = layout.dense_mask()
    classes = block_classes(layout, block).classes
    aligned = layout.n_tokens % block == 0 and sizes.get("text") is None
    for r, row in enumerate(classes):
        for c, cls in enumerate(row):
            cell = mask[r * block : (r + 1) * block, c * block : (c + 1) * block]
            if cls == EMPTY:
                assert not cell.any()
            if cls == FULL:
                assert cell.all() and cell.shape == (block, block)
            if cls == PARTIAL and aligned:
                assert cell.any() and not cell.all()
    flat = [cls for row in classes for cls in row]
    assert EMPTY in flat and (FULL in flat or not aligned)


# ---------------------------------------------------------------- executors

PLANS = {
    "2d": (
        plan_of("groups image[7, 9] text\nimage -> image[kernel 3 5], text\ntext -> *"),
        {"image": 63, "text": 4},
    ),
    "3d": (plan_of("groups video[3, 5, 6]\nvideo -> video[kernel 3 3 3]"), {"video": 90}),
    "near": (plan_of("groups a image[5, 5]\na -> a [causal]\nimage -> image[near 1]"), {"a": 6, "image": 25}),
    "stacked": (
        plan_of("groups left[3, 4] right[3, 4] t\nleft, right -> self[kernel 3 1], t\nt -> *"),
        {"left": 12, "right": 12, "t": 2},
    ),
    "across_groups": (
        plan_of("groups a[2, 3] b[2, 3]\na -> b[near 1]\nb -> a[kernel 1 3]"),
        {"a": 6, "b": 6},
    ),
}


@pytest.mark.parametrize("impl", ["dense", "loop", "batched", "auto", "varlen", "flex"])
@pytest.mark.parametrize("case", sorted(PLANS))
def test_executors_match_the_reference(impl: str, case: str) -> None:
    """Against the mask written from the language's definition (``tests/reference.py``);
    equal-shaped calls stack into one launch, and one group may read another of its shape."""
    plan, sizes = PLANS[case]
    mask = language_mask(plan, sizes)
    assert torch.equal(plan.layout(sizes).dense_mask(), mask)
    assert_forward_and_backward(plan, impl, sizes, mask)


@pytest.mark.parametrize("case", sorted(PLANS))
@pytest.mark.parametrize("lookups", [False, True])
def test_flex_kernel_matches_the_reference(case: str, lookups: bool, cpu_flex_kernel: None) -> None:
    """The ``mask_mod`` (bit sets, or the run tables) and block mask that
    FlexAttention runs, forward on the CPU kernel."""
    from torch.nn.attention.flex_attention import create_mask

    from patternc.nn.flexmask import FlexTables

    plan, sizes = PLANS[case]
    layout = plan.layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu", block=16)
    n = layout.n_tokens
    mask = create_mask(
        tables.mask_mod(lookups=lookups), None, None, tables.q_len, tables.kv_len, device="cpu"
    )
    assert torch.equal(mask[0, 0, :n, :n], layout.dense_mask())
    module = make(plan, "flex")
    x = torch.randn(1, n, 16)
    with torch.no_grad():
        out, _ = module(x, sizes)
    assert relative_error(out, masked_attention(module, x.double(), layout.dense_mask())) < 1e-5


def test_varlen_says_why_it_runs_as_batched() -> None:
    from patternc.lower.varlen import varlen_refusal, varlen_window

    plan, sizes = PLANS["3d"]
    (call,) = plan.layout(sizes).calls
    assert varlen_window(call) is None
    reason = varlen_refusal(call)
    assert reason is not None and "box of coordinates on the shape [3, 5, 6]" in reason


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("source", "code", "message", "hint"),
    [
        ("groups im*[3, 3]\nim* -> self", "E208", "`im*` is a family: a shape belongs to one group",
         "grid family of groups"),
        ("groups im[0, 3]\nim -> im", "E208", "a shape holds whole numbers >= 1, got `0`", "`image[16, 16]`"),
        ("groups im[2, 1.5]\nim -> im", "E208", "got `1.5`", "16 rows of 16 tokens"),
        ("groups text im[7, 9]\ntext, im -> im[kernel 3]", "E025",
         "`kernel 3` on `im[7, 9]` compares token coordinates: the queries `text` do not have the shape [7, 9]",
         "`im -> im[kernel 3]`"),
        ("groups im[7, 9]\nim -> im[kernel 3 3 3]", "E021", "3 sizes for 2 axes", "`[kernel 3 3]`"),
        ("groups im[7, 9]\nim -> im[kernel 9]", "E021", "a kernel of 9 is wider than axis 0 (7 tokens)",
         "`kernel 7` on that axis"),
        ("groups im[7, 9]\nim -> im[kernel 3, causal]", "E023", "beside `causal`: a neighbourhood stands alone",
         "`im[kernel 3]` alone"),
        ("groups im[7, 9]\nim -> im[kernel 3 0]", "E021", "`kernel` takes whole numbers (at least 1), got `0`",
         "`[kernel 3 7 7]`"),
        ("groups im[7, 9]\nim -> im[window 3 4]", "E021", "`window` takes one argument, got 2",
         "one number per axis"),
        ("groups a\na -> a[kernel 3]", "E025", "`kernel 3` compares grid coordinates", "`groups tile*_*`"),
        ("groups t*_*\nt*_* -> t*_*[kernel 3 3 3]", "E021", "`kernel 3 3 3` on `t*_*`: 3 sizes for 2 axes",
         "`[kernel 3 3]`"),
    ],
)  # fmt: skip
def test_errors(source: str, code: str, message: str, hint: str) -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    diag = next(d for d in error.value.diagnostics if d.code == code)
    assert message in diag.message
    assert diag.hint is not None and hint in diag.hint
    assert diag.line is not None and diag.column is not None


@pytest.mark.parametrize(
    ("source", "said"),
    [("groups im[3, 3]\nim -> im[kernel 3], im[near 1]", "`im` is given two relations: [kernel 3] and [near 1]"),
     ("groups im[3, 3]\nim -> im[near 1], (im)[kernel 2 3]", "[near 1] and [kernel 2 3]"),
     ("groups f*\nf* -> f*[upto], f*[before]", "`f*` is given two relations: [upto] and [before]"),
     ("groups t*_*\nt*_* -> (t*_*[kernel 3])[near 1]", "[kernel 3] and [near 1]")],
)  # fmt: skip
def test_two_relations_for_one_key_are_refused(source: str, said: str) -> None:
    """As two token modifier lists are (E023): neither silently wins."""
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    diag = next(d for d in error.value.diagnostics if d.code == "E023")
    assert said in diag.message
    assert diag.hint is not None and "one relation" in diag.hint


def test_the_same_relation_twice_is_one() -> None:
    plan = plan_of("groups im[3, 3]\nim -> im[kernel 3], (im)[kernel 3]")
    assert [c.text() for c in plan.calls] == ["im -> im[kernel 3]"]


@pytest.mark.parametrize("written", ["image [16, 16]", "image[16 16]", "image [16 16]"])
def test_a_shape_written_another_way_gets_its_fix(written: str) -> None:
    source = f"groups {written} text\nimage -> image[kernel 3]\ntext -> *\n"
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    (diag,) = [d for d in error.value.diagnostics if d.code == "E010"]
    assert (
        diag.hint is not None and "touches its group's name" in diag.hint and "`image[16, 16]`" in diag.hint
    )
    assert diag.fix is not None
    fixed = diag.fix.apply(source)
    assert fixed.startswith("groups image[16, 16] text\n")
    patternc.compile(fixed)
    if written.startswith("image ["):  # the `[` found is not also listed as expected
        assert diag.message.startswith(
            "unexpected `[` after a space; expected `[` touching the name before it, "
        )
        assert diag.message.count("`[`") == 2


def test_grid_families_take_a_size_per_axis() -> None:
    """``[kernel 1 3]`` on a grid family of one-token members is the token neighbourhood of that shape."""
    members = plan_of("groups px*_*\npx*_* -> px*_*[kernel 1 3]")
    shaped = plan_of("groups px[4, 5]\npx -> px[kernel 1 3]")
    sizes = {f"px{r}_{c}": 1 for r in range(4) for c in range(5)}
    assert torch.equal(members.layout(sizes).dense_mask(), shaped.layout({"px": 20}).dense_mask())


@pytest.mark.parametrize(
    "source",
    ["groups image[3, 0]\nimage -> image[kernel 9]", "groups frame*[16, 16]\nframe* -> self[kernel 3]",
     "groups frame*[4, 4]\nframe* -> frame*[kernel 3]", "groups a[0, 3] b[2, 3]\na, b -> self[near 1]"],
)  # fmt: skip
def test_a_bad_shape_is_one_error(source: str) -> None:
    """The rules reading a group whose shape was refused are not reported
    again, through ``self`` either (a family with a shape is refused: E208)."""
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    assert [d.code for d in error.value.diagnostics] == ["E208"]


def test_a_neighbourhood_on_self_names_the_queries_without_a_shape() -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile("groups a[3, 4] t u\na, t, u -> self[kernel 3]\n")
    (diag,) = error.value.diagnostics
    assert diag.code == "E025" and diag.message == (
        "`kernel 3` on `self` compares token coordinates: the queries `t`, `u` have no shape"
    )
    assert diag.hint is not None and "`groups t[...]`" in diag.hint and "`a -> a[kernel 3]`" in diag.hint
    assert (diag.line, diag.column) == (2, 16)


@pytest.mark.parametrize(
    ("source", "sizes", "said"),
    [("groups im[1, 9]\nim -> im[kernel 3]", None, "axis 0 (1 token)"),
     ("groups im[1]\nim -> im[near 0]", {"im": 2}, "`im` has 2 tokens, but `im[near 0]` lays its tokens "
      "on the shape [1]: 1 token |"),
     ("groups im[1] q[1]\nq -> im[near 0]\nim -> im", {"im": None, "q": 1}, "give `im` 1 token,")],
)  # fmt: skip
def test_one_token_is_said_in_the_singular(
    source: str, sizes: dict[str, int | None] | None, said: str
) -> None:
    with pytest.raises(PatternError) as error:
        plan = plan_of(source)
        assert sizes is not None
        plan.layout(sizes)
    (diag,) = error.value.diagnostics
    assert said in f"{diag.message} | {diag.hint}"


@pytest.mark.parametrize(
    ("sizes", "said"), [({"im": 62, "q": 63}, "`im` has 62 tokens"), ({"im": None, "q": 63}, "KV cache")]
)
def test_size_off_the_shape_is_refused(sizes: dict[str, int | None], said: str) -> None:
    plan = plan_of("groups im[7, 9] q[7, 9]\nim -> im[kernel 3]\nq -> im[kernel 3]")
    with pytest.raises(PatternError) as error:
        plan.layout(sizes)
    (diag,) = error.value.diagnostics
    assert diag.code == "E409" and said in diag.message and "the shape [7, 9]: 63 tokens" in diag.message
    assert diag.hint is not None and "give `im` 63 tokens" in diag.hint


@pytest.mark.parametrize("impl", ["dense", "loop", "batched", "auto", "varlen", "flex"])
def test_a_cached_image_is_read_by_the_text_that_follows(impl: str) -> None:
    """A VLM decoding text over an image in the KV cache: the image's own
    neighbourhood has no queries in that step, so its size None is no
    position off the shape; the text's outputs are those of the full run."""
    plan = plan_of("groups image[3, 5] text\nimage -> image[kernel 3], text\ntext -> image, text[causal]")
    module = make(plan, impl)
    x = torch.randn(2, 19, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            full, cache = module(x, {"image": 15, "text": 4})
            assert cache is not None
            text, _ = module(x[:, 15:], {"image": None, "text": 4}, kv_cache=cache)
    assert relative_error(text, full[:, 15:]) < 1e-5


def test_a_cached_key_read_through_a_neighbourhood_is_refused() -> None:
    """Queries present on the shape need the key's coordinates: a cached key has none (E409)."""
    plan = plan_of("groups a[2, 3] b[2, 3]\na -> b[near 1]\nb -> b")
    with pytest.raises(PatternError) as error:
        plan.layout({"a": 6, "b": None})
    (diag,) = error.value.diagnostics
    assert diag.code == "E409" and "`b` is read from a KV cache (size None)" in diag.message
    assert plan.layout({"a": 0, "b": None}).n_tokens == 0  # no query reads it here


def test_an_empty_shaped_group_pairs_nothing() -> None:
    plan = plan_of("groups a im[3, 3]\na -> a\nim -> im[kernel 3]")
    assert plan.layout({"a": 4, "im": 0}).dense_mask().sum() == 16


def test_fmt_keeps_shapes_and_per_axis_sizes() -> None:
    from patternc.fmt import format_source

    source = "groups  video[ 4,16 ,16]   text\nvideo->video[kernel 3 7 7] , text\ntext -> *\n"
    formatted = format_source(source)
    assert formatted == "groups video[4, 16, 16] text\nvideo -> video[kernel 3 7 7], text\ntext -> *\n"
    assert format_source(formatted) == formatted
    before, after = plan_of(source), plan_of(formatted)
    assert before.calls == after.calls


def test_plan_text_and_json_name_the_neighbourhood() -> None:
    plan = plan_of("groups video[4, 6, 6]\nvideo -> video[kernel 3 5 5]")
    (call,) = plan.calls
    assert call.text() == "video -> video[kernel 3 5 5]"
    mods = call.keys[0].modifiers
    assert mods.to_dict() == {"causal": False, "window": None, "kernel": [3, 5, 5], "shape": [4, 6, 6]}
    assert plan_of("groups im[4, 4]\nim -> im[near 1]").calls[0].text() == "im -> im[near 1]"


# ---------------------------------------------------------------- exports, pricing, editors


def test_exports_say_the_neighbourhood_or_refuse_with_the_reason() -> None:
    from patternc.export.engines import engine_dict

    plan = plan_of("groups im[3, 4]\nim -> im[kernel 3]")
    layout = plan.layout({"im": 12})
    flex = engine_dict(layout, "flex")
    assert flex["expressible"] and flex["neighbourhoods"] == [
        [{"kind": "kernel", "shape": [3, 4], "sizes": [3, 3]}]
    ]
    for name in ("magi", "flashmask", "xformers"):
        refused = engine_dict(layout, name)
        assert not refused["expressible"] and "box of coordinates on the shape [3, 4]" in refused["reason"]
    varlen = engine_dict(layout, "varlen")
    assert not varlen["expressible"] and "the kernel has only the window" in varlen["reason"]


def test_flex_price_counts_the_blocks_a_neighbourhood_reaches() -> None:
    """A query block of two image rows reaches the key rows of its window:
    the entries flex computes are counted from the coordinates, not only
    the allowed pairs, and never more than the whole square."""
    from patternc.modifiers import Neighbourhood

    grid = Neighbourhood("kernel", (64, 64), (7, 7))
    assert grid.pairs() == (7 * 64) ** 2
    # a block holds two rows r, r + 1 (r even) and reaches rows r - 3 .. r + 4: 512 keys from the middle
    # of a block, so 5 blocks of 128, fewer at the edges
    assert grid.pairs() < grid.block_entries(128) <= 4096 * 128 * 5
    assert Neighbourhood("near", (8, 8), (8, 8)).block_entries(16) == 64 * 64


def test_editor_shows_shapes_and_neighbourhood_words() -> None:
    from patternc import editor

    text = "groups image[16, 16] text\nimage -> image[kernel 7]\ntext -> *\n"
    assert list(editor.declared_groups(text)) == ["image", "text"]
    shown = editor.hover(text, 2, 3)
    assert shown is not None and "shape [16, 16]: 256 tokens" in shown
    meaning = editor.hover(text, 2, 17)
    assert meaning is not None and meaning.startswith("**kernel**") and "on a shaped group, tokens" in meaning
    labels = {c.label for c in editor.completions(text, 2, 16)}
    assert {"kernel", "near"} <= labels


# ---------------------------------------------------------------- context parallel (torch-free planning)


@pytest.mark.parametrize(
    ("kind", "shape", "sizes"),
    [("kernel", (3, 5, 6), (3, 3, 3)), ("near", (7, 9), (1, 2)), ("kernel", (11,), (4,))],
)
def test_prefix_counts_and_reach_follow_the_mask(
    kind: str, shape: tuple[int, ...], sizes: tuple[int, ...]
) -> None:
    """What placement reads of a neighbourhood: the pairs of the first ``m``
    queries (a shard's FLOPs) exactly, and a box of keys that holds every
    key a run of queries reads."""
    from patternc.modifiers import Neighbourhood

    grid = Neighbourhood(kind, shape, sizes)
    mask = neighbourhood(shape, kind, sizes)
    n = grid.n_tokens
    for m in range(n + 1):
        assert grid.pairs_below(m) == int(mask[:m].sum())
    for lo in range(0, n, 5):
        hi = min(n - 1, lo + 8)
        read = mask[lo : hi + 1].any(0).nonzero().flatten()
        first, last = grid.reach(lo, hi)
        assert first <= int(read.min()) and last >= int(read.max())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_placement_counts_the_flops_of_every_shard(world: int) -> None:
    from patternc.distributed.placement import place, rank_loads

    plan = plan_of("groups caption video[3, 5, 6]\ncaption -> *\nvideo -> caption, video[kernel 3 3 3]")
    sizes = {"caption": 5, "video": 90}
    placement = place(plan.groups, plan.calls, sizes, world)
    loads = rank_loads(plan.calls, placement)
    assert sum(loads.flops) == plan.layout(sizes).allowed_entries
    local = placement.local_sizes(0)
    assert plan.layout(local).n_tokens == sum(n or 0 for n in local.values())  # a shard is not refused


def test_self_takes_a_neighbourhood_when_every_query_has_a_shape() -> None:
    plan = plan_of("groups left[3, 4] right[4, 3] t\nleft, right -> self[kernel 3], t\nt -> *")
    explicit = plan_of(
        "groups left[3, 4] right[4, 3] t\nleft -> left[kernel 3], t\nright -> right[kernel 3], t\nt -> *"
    )
    sizes = {"left": 12, "right": 12, "t": 2}
    assert torch.equal(plan.layout(sizes).dense_mask(), explicit.layout(sizes).dense_mask())
    with pytest.raises(PatternError) as error:
        patternc.compile("groups a[3, 4] t\na, t -> self[kernel 3]")
    assert any(d.code == "E025" and "on `self`" in d.message for d in error.value.diagnostics)


def test_linear_attention_refuses_a_neighbourhood() -> None:
    plan, sizes = PLANS["3d"]
    module = make(plan, "linear")
    with pytest.raises(ValueError, match=r"linear attention cannot express \[kernel 3\]"):
        module(torch.randn(1, 90, 16), sizes)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.parametrize("backend", ["batched", "flex", "varlen", "auto"])
@pytest.mark.parametrize(
    ("source", "sizes"),
    [("groups video[8, 16, 16] text\nvideo -> video[kernel 3 7 7], text\ntext -> *", {"video": 2048, "text": 77}),
     ("groups image[37, 41]\nimage -> image[kernel 13 9]", {"image": 1517})],
)  # fmt: skip
def test_gpu_neighbourhoods_bf16(source: str, sizes: dict[str, int], backend: str) -> None:
    """bf16 on the GPU (flex compiled, with its block mask from coordinates)
    against the float64 reference, forward and backward."""
    plan = plan_of(source)
    mask = plan.layout(sizes).dense_mask()
    module = make(plan, backend, dim=128).cuda()
    x = torch.randn(1, sum(sizes.values()), 128, device="cuda", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = module(x, sizes)
    x64 = x.detach().double().requires_grad_(True)
    ref = masked_attention(module, x64, mask.cuda())
    assert relative_error(out, ref) < 2e-2
    grad = torch.randn_like(ref)
    out.float().backward(grad.float())
    ref.backward(grad)
    assert x.grad is not None and x64.grad is not None
    assert relative_error(x.grad, x64.grad) < 5e-2


@pytest.mark.parametrize(
    ("source", "sizes", "skips_pairs"),
    [
        ("groups a[16, 16] b[16, 16]\na -> a[kernel 3]\nb -> b[kernel 3]", {"a": 256, "b": 256}, True),
        ("groups a[8, 16] b\na -> a[near 2]\nb -> b", {"a": 128, "b": 128}, True),
        ("groups image[24, 20]\nimage -> image[kernel 5]", {"image": 480}, False),
    ],
    ids=["two-images", "image-beside-tokens", "one-image-padded"],
)
def test_compiled_flex_reads_the_pair_test_from_its_blocks(
    cpu_flex_kernel: None, source: str, sizes: dict[str, int], skips_pairs: bool
) -> None:
    """Where every block holds one query group and one key group, the
    compiled kernel's ``mask_mod`` skips the group-pair test (the block lists
    tell the pairs apart): its output equals the float64 reference although
    that ``mask_mod`` alone allows pairs of groups that do not read each
    other (counted here, so the case tests something), which only a kernel
    that skips unlisted blocks leaves out."""
    from patternc.nn.executors import EXECUTORS, flex
    from patternc.nn.executors.common import AttentionInputs
    from patternc.nn.flexmask import FlexTables

    layout = patternc.compile(source).patterns["default"].layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu")
    assert tables.blocks_hold_one_pair
    q_idx, kv_idx = torch.arange(tables.q_len)[:, None], torch.arange(tables.kv_len)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    exact = tables.mask_mod()(zero, zero, q_idx, kv_idx)
    within = tables.mask_mod(within_blocks=True)(zero, zero, q_idx, kv_idx)
    assert bool((within & ~exact)[: tables.n_queries].any()) == skips_pairs
    torch.manual_seed(0)
    n = layout.n_tokens
    q, k, v = (torch.randn(2, n, 2, 16) for _ in range(3))
    with torch.no_grad(), flex.compiled(True):
        out = EXECUTORS["flex"](AttentionInputs(q, k, v, layout, {}, None, 0.0, None))
    ref = EXECUTORS["dense"](AttentionInputs(q.double(), k.double(), v.double(), layout, {}, None, 0.0, None))
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    ("source", "sizes", "offsets"),
    [
        ("groups image[6, 7]\nimage -> image[kernel 3]", {"image": 42}, (0, 0)),
        ("groups video[3, 4, 5]\nvideo -> video[kernel 3 3 3]", {"video": 60}, (0, 0)),
        (
            "groups cls image[6, 7]\ncls -> cls, image\nimage -> image[kernel 3]",
            {"cls": 1, "image": 42},
            None,
        ),
    ],
)
def test_one_segment_a_side_computes_positions_from_indices(
    source: str, sizes: dict[str, int], offsets: tuple[int, int] | None
) -> None:
    """Where queries and keys are each one group's one segment, the
    ``mask_mod`` takes positions as indices minus the segment's start (no
    table loads per score); it must allow exactly what the position tables
    say, cell by cell, for the real queries."""
    import dataclasses

    from patternc.nn.flexmask import FlexTables

    layout = patternc.compile(source).patterns["default"].layout(sizes)
    tables = FlexTables.build(layout, {}, "cpu", block=16)
    assert tables.token_offsets == offsets
    looked_up = dataclasses.replace(tables, token_offsets=None)
    q_idx, kv_idx = torch.arange(tables.q_len)[:, None], torch.arange(tables.kv_len)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    real = slice(0, tables.n_queries)
    for within in (False, True):
        fast = tables.mask_mod(within_blocks=within)(zero, zero, q_idx, kv_idx)[real]
        slow = looked_up.mask_mod(within_blocks=within)(zero, zero, q_idx, kv_idx)[real]
        assert torch.equal(fast, slow)
    assert tables.mask_mod()(zero, zero, q_idx, kv_idx)[real].sum() > 0
