"""Structured masks from one pattern file for any number of members: order
between members (block-causal frames, block diffusion), families with parts
(a prefix per document, a question with its answers, an image per text run),
kinds interleaved in any order, and ``self`` beside other keys.

Each mask is checked cell by cell against a reference written from the
outside definition (attention-gym's ``mask_mod`` where it has one), at
several counts and odd lengths with the pattern unchanged, and the
executors against a float64 reference under that mask."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
from reference import masked_attention, relative_error
from test_flex import make

import patternc
from patternc import PatternError
from patternc.lower.layout import Layout
from patternc.nn import PatternAttention

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plan_of(source: str) -> patternc.Plan:
    return patternc.compile(source).patterns["default"]


def mask_of(plan: patternc.Plan, sizes: dict[str, int]) -> torch.Tensor:
    return plan.layout(sizes).dense_mask()


def grid(mask_mod: MaskMod, n_queries: int, n_keys: int) -> torch.Tensor:
    """A ``mask_mod`` evaluated on every (query, key) index: ``[Q, K]`` bool
    (by FlexAttention's own ``create_mask``, which vmaps it per index)."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(mask_mod, None, None, n_queries, n_keys, device="cpu")[0, 0].bool()


def labels(sizes: dict[str, int]) -> list[str]:
    """The run-time group of each token, in input order."""
    return [name for name, n in sizes.items() for _ in range(n)]


def lengths(rng: random.Random, count: int, low: int = 1, high: int = 9) -> list[int]:
    return [rng.randint(low, high) for _ in range(count)]


def assert_matches_reference(module: PatternAttention, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
    """``out`` (from ``x``) and the gradient of ``x`` against the float64 reference under ``mask``."""
    x64 = x.detach().double().requires_grad_()
    ref = masked_attention(module, x64, mask)
    assert relative_error(out, ref) < 1e-5
    weight = torch.randn_like(ref)
    (out * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    assert x.grad is not None and x64.grad is not None
    assert relative_error(x.grad, x64.grad) < 1e-5


# ---------------------------------------------------------------- order between members

FRAMES = plan_of("groups frame*\nframe* -> frame*[upto]")
FRAMES_WINDOW = plan_of("groups frame*\nframe* -> frame*[upto 2]")
FRAMES_BEFORE = plan_of("groups text frame*\ntext -> text [causal]\nframe* -> text, frame*[before 1], self")


@pytest.mark.parametrize("count", [1, 2, 5, 11])
def test_block_causal_frames(count: int) -> None:
    sizes = {f"frame{i}": n for i, n in enumerate(lengths(random.Random(count), count))}
    frame = torch.tensor([i for i, n in enumerate(sizes.values()) for _ in range(n)])
    assert torch.equal(mask_of(FRAMES, sizes), frame[None, :] <= frame[:, None])
    window = (frame[None, :] <= frame[:, None]) & (frame[None, :] >= frame[:, None] - 2)
    assert torch.equal(mask_of(FRAMES_WINDOW, sizes), window)


@pytest.mark.parametrize("count", [1, 3, 6])
def test_frames_read_the_one_before_and_themselves(count: int) -> None:
    sizes = {"text": 3, **{f"frame{i}": n for i, n in enumerate(lengths(random.Random(7 + count), count))}}
    frame = torch.tensor([-1] * 3 + [i for i in range(count) for _ in range(sizes[f"frame{i}"])])
    q, k = frame[:, None], frame[None, :]
    expected = (q >= 0) & ((k == -1) | (k == q) | (k == q - 1))
    text = torch.arange(3)
    expected[:3, :3] = text[None, :] <= text[:, None]
    assert torch.equal(mask_of(FRAMES_BEFORE, sizes), expected)


@pytest.mark.parametrize(("seq_len", "block"), [(12, 4), (13, 4), (7, 3), (5, 8)])
def test_block_diffusion_matches_attention_gym(seq_len: int, block: int) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    plan = plan_of("groups noisy* clean*\nnoisy* -> self, clean*[before]\nclean* -> clean*[upto]")
    blocks = [min(block, seq_len - s) for s in range(0, seq_len, block)]
    sizes = {f"noisy{i}": n for i, n in enumerate(blocks)} | {f"clean{i}": n for i, n in enumerate(blocks)}
    expected = grid(masks.generate_block_diffusion_mask(seq_len, block), 2 * seq_len, 2 * seq_len)
    assert torch.equal(mask_of(plan, sizes), expected)


# ---------------------------------------------------------------- families with parts

DOC_PREFIX = plan_of("""
groups doc*{prefix, text}
doc*.prefix -> self
doc*.text -> doc*.prefix[same], self[causal]
""")


@pytest.mark.parametrize(("prefix", "texts"), [(3, [4]), (2, [5, 1, 7]), (4, [2, 9, 3, 6, 1])])
def test_prefix_lm_per_document_matches_attention_gym(prefix: int, texts: list[int]) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    sizes: dict[str, int] = {}
    for i, n in enumerate(texts):
        sizes |= {f"doc{i}.prefix": prefix, f"doc{i}.text": n}
    offsets = masks.document_mask.length_to_offsets([prefix + n for n in texts], "cpu")
    mask_mod = masks.generate_doc_mask_mod(masks.generate_prefix_lm_mask(prefix), offsets)
    n = sum(sizes.values())
    assert torch.equal(mask_of(DOC_PREFIX, sizes), grid(mask_mod, n, n))


def test_documents_may_lack_a_part() -> None:
    sizes = {"doc0.text": 3, "doc1.prefix": 2, "doc1.text": 2, "doc2.prefix": 1}
    member = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    prefix = torch.tensor([False, False, False, True, True, False, False, True])
    position = torch.arange(8)
    same = member[:, None] == member[None, :]
    text_query = same & (prefix[None, :] | (position[None, :] <= position[:, None]))
    prefix_query = same & prefix[None, :]
    expected = torch.where(prefix[:, None], prefix_query, text_query)
    assert torch.equal(mask_of(DOC_PREFIX, sizes), expected)


SHARED_QUESTION = plan_of("""
groups qa*{question, answer*}
qa*.question -> self[causal]
qa*.answer* -> qa*.question[same], self[causal]
""")


@pytest.mark.parametrize("answers", [[2], [3, 1], [1, 4, 2]])
def test_shared_question_matches_attention_gym(answers: list[int]) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    rng = random.Random(len(answers))
    sizes: dict[str, int] = {}
    prefix_of: list[int] = []
    for i, count in enumerate(answers):
        sizes[f"qa{i}.question"] = rng.randint(1, 6)
        question = len(prefix_of)
        prefix_of.append(question)
        for j in range(count):
            sizes[f"qa{i}.answer{j}"] = rng.randint(1, 6)
            prefix_of.append(question)
    offsets = masks.document_mask.length_to_offsets(list(sizes.values()), "cpu")
    mask_mod = masks.generate_shared_prefix_mask_mod(offsets, torch.tensor(prefix_of))
    n = sum(sizes.values())
    assert torch.equal(mask_of(SHARED_QUESTION, sizes), grid(mask_mod, n, n))


FLAMINGO = plan_of("""
groups run*{image, text}
run*.image -> self
run*.text -> run*.image[same], self[causal]
""")


@pytest.mark.parametrize("texts", [[3], [2, 5], [4, 1, 6]])
def test_each_text_run_reads_its_own_image_as_attention_gym(texts: list[int]) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    image_tokens = 3
    sizes: dict[str, int] = {}
    for i, n in enumerate(texts):
        sizes |= {f"run{i}.image": image_tokens, f"run{i}.text": n}
    text_ends = torch.tensor(texts).cumsum(0)
    intervals = torch.stack([text_ends - torch.tensor(texts), text_ends], 1)
    cross = grid(
        masks.generate_vision_cross_attention_mask_mod(intervals, image_tokens),
        sum(texts),
        image_tokens * len(texts),
    )
    names = labels(sizes)
    is_text = torch.tensor([name.endswith(".text") for name in names])
    mask = mask_of(FLAMINGO, sizes)
    assert torch.equal(mask[is_text][:, ~is_text], cross)


# ---------------------------------------------------------------- kinds interleaved in any order

INTERLEAVED = plan_of("""
groups system run*{text, image}
system -> system [causal]
run*.text -> system, run*[before], self[causal]
run*.image -> system, run*[before], self
""")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_interleaved_text_and_images(seed: int) -> None:
    """The VLM mask of interleaved inputs: causal over the whole sequence,
    and each image run bidirectional within itself."""
    rng = random.Random(seed)
    sizes = {"system": rng.randint(1, 4)}
    for i in range(rng.randint(1, 7)):
        sizes[f"run{i}.{rng.choice(['text', 'image'])}"] = rng.randint(1, 6)
    names = labels(sizes)
    n = len(names)
    position = torch.arange(n)
    run = torch.tensor([hash(name) for name in names])
    image = torch.tensor([name.endswith(".image") for name in names])
    causal = position[None, :] <= position[:, None]
    same_image = image[:, None] & (run[:, None] == run[None, :])
    assert torch.equal(mask_of(INTERLEAVED, sizes), causal | same_image)


def test_a_kind_may_repeat_in_a_row() -> None:
    sizes = {"system": 1, "run0.image": 2, "run1.image": 2, "run2.text": 2}
    mask = mask_of(INTERLEAVED, sizes)
    assert not mask[1, 3] and mask[3, 1] and mask[3, 4] and mask[1, 2]


# ---------------------------------------------------------------- self beside other keys


def test_self_beside_other_keys() -> None:
    plan = plan_of("groups question answer*\nquestion -> question [causal]\nanswer* -> question, self[causal]")
    sizes = {"question": 4, "answer0": 3, "answer1": 5}
    names = labels(sizes)
    position = torch.tensor([i for n in sizes.values() for i in range(n)])
    group = torch.tensor([list(sizes).index(name) for name in names])
    same = group[:, None] == group[None, :]
    question_key = (group[None, :] == 0) & (group[:, None] > 0)
    expected = (same & (position[None, :] <= position[:, None])) | question_key
    assert torch.equal(mask_of(plan, sizes), expected)


def test_self_beside_keys_of_plain_groups_is_one_rule_per_group() -> None:
    plan = plan_of("groups a b c\na, b -> c, self [causal]\nc -> c")
    assert [(r.queries, r.keys_values) for r in plan.rules[:2]] == [(("a",), ("c", "a")), (("b",), ("c", "b"))]
    assert all(k.modifiers.causal for r in plan.rules[:2] for k in r.keys)


# ---------------------------------------------------------------- one file, changing members


def test_one_plan_serves_any_member_count_and_names_its_calls() -> None:
    for count in (1, 4, 9):
        sizes = {f"frame{i}": 2 + i % 3 for i in range(count)}
        layout = FRAMES.layout(sizes)
        assert layout.n_tokens == sum(sizes.values()) and len(layout.calls) == count
    bound = FRAMES.bind(["frame0", "frame1", "frame2"])
    assert [r.keys_values for r in bound.rules] == [
        ("frame0",),
        ("frame0", "frame1"),
        ("frame0", "frame1", "frame2"),
    ]


def test_parts_have_their_own_types() -> None:
    assert DOC_PREFIX.types == {"doc*.prefix": "prefix", "doc*.text": "text"}
    bound = SHARED_QUESTION.bind(["qa0.question", "qa0.answer0", "qa0.answer1"])
    assert bound.group_types == ("question", "answer", "answer")


# ---------------------------------------------------------------- executors


STRUCTURES: dict[str, tuple[patternc.Plan, Sequence[dict[str, int]]]] = {
    "frames": (
        FRAMES_BEFORE,
        [{"text": 3, "frame0": 5, "frame1": 1, "frame2": 7}, {"text": 1, "frame0": 0, "frame1": 1, "frame2": 2}],
    ),
    "documents": (
        DOC_PREFIX,
        [
            {"doc0.prefix": 3, "doc0.text": 5, "doc1.prefix": 2, "doc1.text": 9},
            {"doc0.prefix": 0, "doc0.text": 1, "doc1.prefix": 1, "doc1.text": 0, "doc2.text": 4},
        ],
    ),
    "interleaved": (
        INTERLEAVED,
        [
            {"system": 2, "run0.image": 5, "run1.text": 3, "run2.text": 4, "run3.image": 3, "run4.text": 6},
            {"system": 1, "run0.text": 1, "run1.image": 0, "run2.image": 1},
        ],
    ),
    "questions": (
        SHARED_QUESTION,
        [{"qa0.question": 4, "qa0.answer0": 3, "qa0.answer1": 5, "qa1.question": 2, "qa1.answer0": 7}],
    ),
}


@pytest.mark.parametrize("impl", ["dense", "loop", "batched", "auto", "varlen"])
@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_executors_match_the_reference(impl: str, structure: str) -> None:
    plan, size_sets = STRUCTURES[structure]
    for sizes in size_sets:
        module = make(plan, impl)
        x = torch.randn(2, sum(sizes.values()), 16, requires_grad=True)
        out, _ = module(x, sizes)
        assert_matches_reference(module, x, out, mask_of(plan, sizes))


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_flex_matches_the_reference(structure: str, cpu_flex_kernel: None) -> None:
    plan, size_sets = STRUCTURES[structure]
    sizes = size_sets[0]
    module = make(plan, "flex")
    x = torch.randn(1, sum(sizes.values()), 16)
    with torch.no_grad():
        out, _ = module(x, sizes)
    ref = masked_attention(module, x.double(), mask_of(plan, sizes))
    assert relative_error(out, ref) < 1e-5


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "code", "message", "hint"),
    [
        ("groups a frame*\na -> a[upto]\nframe* -> self", "E025", "`upto` on `a`, which is not a family",
         "put it on a family key"),
        ("groups a frame*\na -> frame*[same]\nframe* -> self", "E025", "with queries `a` that are not families",
         "only in rules whose queries are families"),
        ("groups frame*\nframe* -> frame*[upto, before]", "E022", "two member relations (`upto` and `before`)",
         "keep one of"),
        ("groups frame*\nframe* -> frame*[upto 0]", "E021", "`upto` takes a whole number of members",
         "`[upto 2]`"),
        ("groups frame*\nframe* -> frame*[same 2]", "E021", "`same` takes no argument", "`[same]`"),
        ("groups frame*\nframe* -> frame*[upto], self", "E205", "`self` repeats `frame*[upto]`",
         "frame* -> frame*[before], self"),
        ("groups frame*\nframe* -> self[upto]", "E025", "`upto` on `self`", "drop it"),
        ("groups doc{a, b}\ndoc.a -> doc.a", "E206", "`doc` is not a family", "`doc*{...}`"),
        ("groups doc*{a, a}\ndoc*.a -> self", "E206", "part `a` given twice", "list each part once"),
        ("groups doc*{a, 1b}\ndoc*.a -> self", "E206", "`1b` is not a part name", "`answer*`"),
        ("groups frame*\nframe* -> frame*[near 1]", "E025", "`near 1` compares grid coordinates",
         "`groups tile*_*`"),
        ("groups a*_* b*_*_*\na*_* -> b*_*_*[kernel 3]\nb*_*_* -> self", "E025", "as many axes", "one `*` per axis"),
        ("groups t*_*\nt*_* -> t*_*[kernel]", "E021", "`kernel` needs a number of members", "`[kernel 3]`"),
        ("groups t*_*\nt*_* -> t*_*[near -1]", "E021", "`near` takes a whole number of members (at least 0)",
         "`[near 1]`"),
    ],
)  # fmt: skip
def test_errors(source: str, code: str, message: str, hint: str) -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    diag = next(d for d in error.value.diagnostics if d.code == code)
    assert message in diag.message
    assert diag.hint is not None and hint in diag.hint
    assert diag.line is not None and diag.column is not None


def test_a_member_left_with_no_keys_is_named() -> None:
    plan = plan_of("groups frame*\nframe* -> frame*[before]")
    with pytest.raises(PatternError) as error:
        plan.layout({"frame0": 2, "frame1": 2})
    (diag,) = error.value.diagnostics
    assert diag.code == "E407" and "`frame0` reads no keys" in diag.message
    assert diag.hint is not None and "add `self`" in diag.hint


def test_unknown_part_is_not_a_member() -> None:
    with pytest.raises(PatternError) as error:
        DOC_PREFIX.layout({"doc0.prefix": 2, "doc0.title": 3})
    (diag,) = error.value.diagnostics
    assert diag.code == "E405" and "`doc0.title`" in diag.message


# ---------------------------------------------------------------- grids of members


def tiles(rows: int, cols: int, tokens: int) -> dict[str, int]:
    return {f"tile{r}_{c}": tokens for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize(
    ("tile", "canvas", "kernel"), [((2, 2), (5, 4), 3), ((1, 1), (6, 7), 3), ((2, 3), (4, 4), 2), ((1, 2), (3, 5), 5)]
)
def test_sliding_tile_attention_matches_attention_gym(
    tile: tuple[int, int], canvas: tuple[int, int], kernel: int
) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    plan = plan_of(f"groups tile*_* text\ntile*_* -> tile*_*[kernel {kernel}], text\ntext -> *")
    (tile_h, tile_w), (rows, cols) = tile, canvas
    sizes = tiles(rows, cols, tile_h * tile_w) | {"text": 3}
    mask_mod = masks.generate_sta_mask_mod_2d(
        (rows * tile_h, cols * tile_w), (kernel * tile_h, kernel * tile_w), tile, text_seq_len=3
    )
    n = sum(sizes.values())
    assert torch.equal(mask_of(plan, sizes), grid(mask_mod, n, n))


@pytest.mark.parametrize(("tile", "canvas", "kernel"), [((1, 2, 2), (3, 3, 4), 3), ((2, 1, 1), (4, 5, 3), 3)])
def test_sliding_tile_attention_in_3d_matches_attention_gym(
    tile: tuple[int, int, int], canvas: tuple[int, int, int], kernel: int
) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    plan = plan_of(f"groups text cell*_*_*\ntext -> *\ncell*_*_* -> text, cell*_*_*[kernel {kernel}]")
    tokens = tile[0] * tile[1] * tile[2]
    shape = [range(n) for n in canvas]
    cells = {f"cell{t}_{r}_{c}": tokens for t in shape[0] for r in shape[1] for c in shape[2]}
    sizes = {**cells, "text": 2}  # the pattern declares text first; the input puts it last, as STA does
    mask_mod = masks.generate_sta_mask_mod_3d(
        tuple(n * t for n, t in zip(canvas, tile)), tuple(kernel * t for t in tile), tile, text_seq_len=2
    )
    n = sum(sizes.values())
    layout = plan.layout({"text": 2, **cells})
    order = torch.tensor([i for name in sizes for i in _token_indices(layout, name)])
    mask = layout.dense_mask()[order][:, order]
    assert torch.equal(mask, grid(mask_mod, n, n))


def _token_indices(layout: Layout, name: str) -> range:
    slot = next(s for s in layout.slots if s.name == name)
    return range(slot.offset, slot.offset + slot.size)


@pytest.mark.parametrize(("side", "kernel"), [(5, 3), (7, 5), (4, 3), (3, 3)])
def test_token_neighbourhoods_match_natten(side: int, kernel: int) -> None:
    masks = pytest.importorskip("attn_gym.masks")
    plan = plan_of(f"groups pixel*_*\npixel*_* -> pixel*_*[kernel {kernel}]")
    sizes = {f"pixel{r}_{c}": 1 for r in range(side) for c in range(side)}
    mask_mod = masks.generate_natten(side, side, kernel, kernel)
    assert torch.equal(mask_of(plan, sizes), grid(mask_mod, side * side, side * side))


def test_near_cuts_the_neighbourhood_at_the_edges() -> None:
    plan = plan_of("groups cell*_*_*\ncell*_*_* -> cell*_*_*[near 1]")
    rng = random.Random(3)
    shape = (2, 3, 4)
    cells = [(t, r, c) for t in range(shape[0]) for r in range(shape[1]) for c in range(shape[2])]
    rng.shuffle(cells)  # input order is free: coordinates come from the names
    sizes = {f"cell{t}_{r}_{c}": rng.randint(1, 3) for t, r, c in cells}
    at = torch.tensor([cell for cell, n in zip(cells, sizes.values()) for _ in range(n)])
    expected = (at[:, None, :] - at[None, :, :]).abs().max(-1).values <= 1
    assert torch.equal(mask_of(plan, sizes), expected)


# ---------------------------------------------------------------- queries that read nothing

PERCEIVER = plan_of("groups latents inputs\nlatents -> latents, inputs\ninputs -> nothing")


@pytest.mark.parametrize("impl", ["dense", "loop", "batched", "auto", "varlen", "linear"])
@pytest.mark.parametrize("sizes", [{"latents": 3, "inputs": 11}, {"latents": 1, "inputs": 1}, {"latents": 4, "inputs": 0}])
def test_queries_that_read_nothing_give_zeros(impl: str, sizes: dict[str, int]) -> None:
    module = make(PERCEIVER, impl)
    x = torch.randn(2, sum(sizes.values()), 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # varlen on CPU says it runs as batched
        out, _ = module(x, sizes)
    mask = mask_of(PERCEIVER, sizes)
    assert not mask[sizes["latents"] :].any()
    if impl == "linear":  # another function: only its rows that read nothing are compared
        rows = out[:, sizes["latents"] :]  # zero attention, then the output projection's bias
        assert torch.equal(rows, module.proj.bias.expand_as(rows))
        return
    assert_matches_reference(module, x, out, mask)


def test_flex_queries_that_read_nothing_give_zeros(cpu_flex_kernel: None) -> None:
    sizes = {"latents": 3, "inputs": 9}
    module = make(PERCEIVER, "flex")
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        out, _ = module(x, sizes)
    assert relative_error(out, masked_attention(module, x.double(), mask_of(PERCEIVER, sizes))) < 1e-5


def test_reading_nothing_is_never_launched() -> None:
    layout = PERCEIVER.layout({"latents": 3, "inputs": 1000})
    assert len(layout.launches) == 1 and layout.calls[1].attention.keys == ()


def test_a_group_named_nothing_keeps_its_meaning() -> None:
    plan = plan_of("groups a nothing\na -> nothing\nnothing -> self")
    assert [r.keys_values for r in plan.rules] == [("nothing",), ("nothing",)]


@pytest.mark.parametrize("source", ["groups a b\na -> b, nothing\nb -> b", "groups a b\na -> nothing [causal]\nb -> b"])
def test_nothing_stands_alone(source: str) -> None:
    with pytest.raises(PatternError) as error:
        patternc.compile(source)
    diag = next(d for d in error.value.diagnostics if d.code == "E207")
    assert "`nothing` must be the whole key side of a rule" in diag.message
    assert diag.hint is not None and "inputs -> nothing" in diag.hint and diag.line == 2


# ---------------------------------------------------------------- tools


def test_fmt_writes_parts_glued_to_their_family() -> None:
    from patternc.fmt import format_source

    source = "groups system   run*{text,image}\ngroups qa* {\n  question,\n  answer*\n}\n" \
        "system -> self\nrun*.text -> system, run*[before],self[causal]\nrun*.image -> system, run*[before], self\n" \
        "qa*.question -> self\nqa*.answer* -> qa*.question[same], self[causal]\n"  # fmt: skip
    formatted = format_source(source)
    assert formatted.splitlines()[:5] == ["groups system run*{text, image}", "groups qa*{", "    question,",
                                          "    answer*", "}"]  # fmt: skip
    assert "run*.text -> system, run*[before], self[causal]" in formatted
    assert format_source(formatted) == formatted
    before = patternc.compile(source).patterns["default"]
    after = patternc.compile(formatted).patterns["default"]
    assert [(r.queries, r.keys) for r in before.rules] == [(r.queries, r.keys) for r in after.rules]


def test_editor_knows_parts_and_relations() -> None:
    from patternc import editor

    text = "groups sys run*{text, image}\nsys -> sys\nrun*.text -> run*[before], self\nrun*.image -> self\n"
    assert list(editor.declared_groups(text)) == ["sys", "run*.text", "run*.image"]
    kinds = {c.label: c.kind for c in editor.completions(text, 3, 19)}
    assert kinds["upto"] == "member relation" and kinds["causal"] == "modifier"

