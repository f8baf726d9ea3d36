"""Member relations stay linear in the number of members.

A relation family (``frame* -> frame*[upto]``) binds one rule per query
member whose keys are a slice of one shared run (:class:`patternc.ir.Keys`),
and the layout reads each slice in O(1). These tests count what binding and
laying out materialise (key records, slices, traced memory), never wall time,
and check every layout record against one built key group by key group.
"""

from __future__ import annotations

import itertools
import pickle
import random
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

import patternc
from patternc.ir import KeyGroup, KeyRun, Keys
from patternc.lower.layout import GroupSlot, Layout
from patternc.modifiers import Modifiers, allowed_pairs
from patternc.plan import BINDINGS, LAYOUTS

FRAMES = patternc.compile(
    "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]"
).patterns["default"]


def _frames(count: int, length: int = 3) -> dict[str, int | None]:
    return {"prompt": 4, **{f"frame{i}": length for i in range(count)}}


# ------------------------------------------------------------------ Keys


def _keys(*names: str, mods: Modifiers | None = None) -> tuple[KeyGroup, ...]:
    return tuple(KeyGroup(n, mods or Modifiers()) for n in names)


def test_keys_equal_the_tuple_of_their_groups_however_they_are_cut() -> None:
    groups = _keys("a", "b", "c", "d")
    run = KeyRun(groups)
    cuts = [Keys([(run, 0, 4)]), Keys([(run, 0, 1), (run, 1, 3), (run, 3, 4)]), Keys.of(groups)]
    other = Keys([(KeyRun(groups[:2]), 0, 2), (KeyRun(groups[2:]), 0, 2)])
    for keys in [*cuts, other]:
        assert keys == groups and groups == keys and list(keys) == list(groups)
        assert hash(keys) == hash(cuts[0])
        assert len(keys) == 4 and keys[1] == groups[1] and keys[-1] == groups[3]
        assert keys[1:3] == groups[1:3]
    assert Keys([(run, 1, 3)]) != Keys([(run, 0, 2)]) and Keys([(run, 1, 3)]) != groups[:2]
    assert Keys([(run, 2, 2)]) == () and not Keys([(run, 2, 2)])
    assert Keys.of(groups) != list(groups)  # a tuple's equals, not a list's
    assert {cuts[0]: 1}[cuts[1]] == 1


def test_keys_concatenate_as_the_tuple_they_were() -> None:
    """``AttentionCall.keys`` was a tuple: code that adds keys to it gets a tuple."""
    call = FRAMES.bind(list(_frames(3))).calls[-1]
    extra = _keys("z")
    assert call.keys + extra == (*call.keys, *extra) and type(call.keys + extra) is tuple
    assert extra + call.keys == (*extra, *call.keys) and type(extra + call.keys) is tuple
    assert call.keys + call.keys == tuple(call.keys) * 2
    with pytest.raises(TypeError):
        call.keys + list(extra)  # type: ignore[operator]


def test_keys_index_errors_and_pickling() -> None:
    keys = Keys([(KeyRun(_keys("a", "b", "c")), 1, 3)])
    with pytest.raises(IndexError, match="key index out of range"):
        keys[2]
    with pytest.raises(IndexError, match="key index out of range"):
        keys[-3]
    copy = pickle.loads(pickle.dumps(keys))
    assert copy == keys and hash(copy) == hash(keys) and repr(copy) == repr(_keys("b", "c"))


def test_a_slice_of_a_run_of_mixed_modifiers_knows_its_own() -> None:
    causal = Modifiers(causal=True)
    run = KeyRun((*_keys("a", "b"), *_keys("c", "d", mods=causal)))
    assert run.modifiers is None
    assert run.slice_modifiers(2, 4) == causal and run.slice_modifiers(0, 2) == Modifiers()
    assert run.slice_modifiers(1, 3) is None
    call = patternc.ir.AttentionCall(("q",), Keys([(run, 2, 4)]))
    assert call.uniform_modifiers == causal


# ------------------------------------------------------- linear structure


def test_a_block_causal_binding_holds_one_slice_of_one_run_per_member() -> None:
    count = 4096
    plan = FRAMES.bind(list(_frames(count)))
    member_rules = [r for r in plan.rules if r.queries[0].startswith("frame")]
    assert len(member_rules) == count
    runs = {id(run) for r in plan.rules for run, _, _ in Keys.of(r.keys).parts}
    slices = sum(len(Keys.of(r.keys).parts) for r in plan.rules)
    assert len(runs) <= 3  # the prompt's, the prompt as a key of frames, the frames in order
    assert slices <= 2 * count + 1
    last = member_rules[-1]
    assert len(last.keys) == count + 1 and last.keys[-1].name == f"frame{count - 1}"


def test_a_block_causal_layout_holds_linear_records() -> None:
    """4096 frames: one call per frame, each one key segment (prompt and
    frames 0..k lie end to end), and pairs are not materialised."""
    count = 4096
    layout = FRAMES.layout(_frames(count))
    frame_calls = [c for c in layout.calls if c.query_tokens[0].startswith("frame")]
    assert len(frame_calls) == count
    assert all(len(c.keys) == 1 and c.key_access == "view" for c in frame_calls)
    assert frame_calls[-1].n_keys == 4 + 3 * count
    pairs = layout.pairs
    assert not pairs._keys  # type: ignore[attr-defined]  # nothing read yet
    index = {g: i for i, g in enumerate(layout.all_groups)}
    assert pairs[index["frame9"], index["frame2"]] == Modifiers()
    assert (index["frame2"], index["frame9"]) not in pairs
    assert len(pairs._keys) <= 2  # type: ignore[attr-defined]  # only the asked query's call was read


def _peak_bytes(count: int) -> int:
    sizes = _frames(count)
    LAYOUTS.clear()
    BINDINGS.clear()
    tracemalloc.start()
    FRAMES.layout(sizes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    LAYOUTS.clear()
    BINDINGS.clear()
    return peak


def test_binding_and_layout_memory_grow_linearly_with_block_causal_frames() -> None:
    """Four times the frames cost about four times the memory; the
    M(M+1)/2 (query, key) pairs of block-causal frames would cost sixteen."""
    small, large = _peak_bytes(1024), _peak_bytes(4096)
    assert large / small < 6, (small, large)


def test_binding_makes_key_records_linear_in_members(monkeypatch: pytest.MonkeyPatch) -> None:
    made = [0]
    init = KeyGroup.__post_init__

    def counted(self: KeyGroup) -> None:
        made[0] += 1
        init(self)

    monkeypatch.setattr(KeyGroup, "__post_init__", counted)
    for count in (1000, 4000):
        made[0] = 0
        BINDINGS.clear()
        FRAMES.bind(list(_frames(count)))
        assert made[0] <= 2 * count + 10, (count, made[0])
    BINDINGS.clear()


def test_layout_visits_each_key_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Laying out block-causal frames reads the calls' keys by their slices:
    iterating every call's keys (as looking for neighbourhoods key by key
    would) visits M(M+1)/2 groups."""
    visited = [0]
    iterate = Keys.__iter__

    def counted(self: Keys) -> Iterator[KeyGroup]:
        for key in iterate(self):
            visited[0] += 1
            yield key

    for count in (1000, 4000):
        plan = FRAMES.bind(list(_frames(count)))
        LAYOUTS.clear()
        visited[0] = 0
        with monkeypatch.context() as patch:
            patch.setattr(Keys, "__iter__", counted)
            plan.layout(_frames(count))
        assert visited[0] <= 4 * count + 10, (count, visited[0])
    LAYOUTS.clear()


# -------------------------------------- records equal a key-by-key build


SOURCES = {
    "frames": "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
    "window of members": "groups frame*\nframe* -> frame*[upto 2]",
    "before and self": "groups f*\nf* -> f*[before 2], self[window 2]",
    "relation with modifiers": "groups f*\nf* -> f*[upto 1, causal]",
    "diffusion": "groups noisy* clean*\nnoisy* -> self, clean*[before]\nclean* -> clean*[upto]",
    "interleaved": (
        "groups system run*{text, image}\nsystem -> system [causal]\n"
        "run*.text -> system, run*[before], self[causal]\nrun*.image -> system, run*[before], self"
    ),
    "parts": "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]",
    "two families": "groups a* b*\na* -> a*[upto], b*[same]\nb* -> b*[before], self",
}


def _sizes(name: str, rng: random.Random) -> dict[str, int | None]:
    count = rng.randint(1, 7)

    def size() -> int:
        return rng.choice([0, 1, 1, 2, 5, 9]) if rng.random() < 0.5 else rng.randint(1, 6)

    if name == "frames":
        return {"prompt": size(), **{f"frame{i}": size() for i in range(count)}}
    if name == "window of members":
        return {f"frame{i}": size() for i in range(count)}
    if name in ("before and self", "relation with modifiers"):
        return {f"f{i}": size() for i in range(count)}
    if name == "diffusion":
        return {**{f"noisy{i}": size() for i in range(count)}, **{f"clean{i}": size() for i in range(count)}}
    if name == "interleaved":
        return {"system": size(), **{f"run{i}.{rng.choice(['text', 'image'])}": size() for i in range(count)}}
    if name == "parts":
        out: dict[str, int | None] = {}
        for i in range(count):
            if rng.random() < 0.7:
                out[f"doc{i}.prefix"] = size()
            out[f"doc{i}.text"] = size()
        return out
    return {**{f"a{i}": size() for i in range(count)}, **{f"b{i}": size() for i in range(count)}}


def _reference_segments(
    keys: Sequence[KeyGroup], slots: Mapping[str, GroupSlot]
) -> list[tuple[int, int, str | None, Modifiers]]:
    """Input key segments as the key groups give them one by one: sorted,
    adjacent ones of equal modifiers merged, then cached groups."""
    inputs = sorted(
        (slots[k.name].offset, slots[k.name].offset + (slots[k.name].size or 0), k.modifiers)
        for k in keys
        if slots[k.name].size
    )
    merged: list[tuple[int, int, str | None, Modifiers]] = []
    for start, stop, mods in inputs:
        if merged and merged[-1][1] == start and merged[-1][3] == mods:
            merged[-1] = (merged[-1][0], stop, None, mods)
        else:
            merged.append((start, stop, None, mods))
    cached = [(0, -1, k.name, k.modifiers) for k in keys if slots[k.name].size is None]
    return merged + cached


def _check_layout(layout: Layout) -> None:
    slots = {s.name: s for s in layout.slots}
    index = {g: i for i, g in enumerate(layout.all_groups)}
    expected_pairs: dict[tuple[int, int], Modifiers] = {}
    read_as_keys: set[str] = set()
    for call in layout.calls:
        keys = tuple(call.attention.keys)
        queries = [slots[q] for q in call.query_tokens]
        assert [(s.start, s.stop, s.cached, s.modifiers) for s in call.keys] == _reference_segments(
            keys, slots
        )
        assert call.n_keys == sum(slots[k.name].size or 0 for k in keys)
        present = [slots[k.name] for k in keys if slots[k.name].size != 0]
        assert call.single_groups == (sum(1 for q in queries if q.size) == 1 and len(present) == 1)
        inputs = sorted((s.offset, s.offset + (s.size or 0)) for s in present if s.size is not None)
        if not present:
            access = "empty"
        elif len(inputs) < len(present):
            access = "view" if len(present) == 1 else "gather"
        else:
            access = "view" if all(a[1] == b[0] for a, b in itertools.pairwise(inputs)) else "gather"
        assert call.key_access == access
        allowed = sum(
            allowed_pairs(q.size or 0, slots[k.name].size or 0, k.modifiers, slots[k.name].offset - q.offset)
            for q in queries
            for k in keys
        )
        assert call.allowed_entries == allowed
        read_as_keys.update(k.name for k in keys)
        for q in call.attention.queries:
            for k in keys:
                expected_pairs[index[q], index[k.name]] = k.modifiers
    assert dict(layout.pairs) == expected_pairs and len(layout.pairs) == len(expected_pairs)
    assert list(layout.pairs) == list(expected_pairs)
    assert layout.key_value_groups == tuple(g for g in layout.input_groups if g in read_as_keys)
    for pair, mods in expected_pairs.items():
        assert layout.pairs[pair] == mods and layout.allows(*pair)
    with pytest.raises(KeyError):
        layout.pairs[len(layout.all_groups), 0]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_layout_records_equal_a_build_key_group_by_key_group(name: str) -> None:
    plan = patternc.compile(SOURCES[name]).patterns["default"]
    rng = random.Random(name)
    checked = 0
    for _ in range(25):
        sizes = _sizes(name, rng)
        try:
            layout = plan.layout(sizes)
        except patternc.PatternError:
            continue  # sizes that leave a member with no keys (E407): refused as before
        _check_layout(layout)
        checked += 1
    assert checked >= 10


def test_a_cached_member_falls_back_key_by_key_and_stays_exact() -> None:
    sizes = {"prompt": 3, "frame0": 2, "frame1": None, "frame2": 4, "frame3": 0, "frame4": 5}
    layout = FRAMES.layout(sizes)
    _check_layout(layout)
    assert layout.cached_groups == ("frame1",)
    last = layout.calls[-1]
    assert [s.cached for s in last.keys] == [None, "frame1"] and last.key_access == "gather"


def test_rows_and_stack_modifiers_keep_slices_of_one_run() -> None:
    """Stacking rows (``per_row``) and the stack's ``causal`` rename or
    tighten each run once: rules still read slices, and equal the groups
    changed one by one."""
    from patternc.nn.transformer import with_modifiers

    names = list(_frames(600))
    stacked = FRAMES.per_row([names, names[:301]])
    runs = {id(run) for r in stacked.rules for run, _, _ in Keys.of(r.keys).parts}
    assert len(stacked.rules) == 2 + 600 + 300 and len(runs) <= 6
    last = stacked.rules[-1]
    assert last.queries == ("frame299@1",) and tuple(last.keys) == (
        KeyGroup("prompt@1"),
        *(KeyGroup(f"frame{i}@1") for i in range(300)),
    )
    _check_layout(stacked.layout({**{f"{g}@0": 2 for g in names}, **{f"{g}@1": 1 for g in names[:301]}}))

    causal = Modifiers(causal=True)
    bound = FRAMES.bind(names[:40])
    tightened = with_modifiers(bound, causal)
    for rule, original in zip(tightened.rules, bound.rules):
        assert tuple(rule.keys) == tuple(KeyGroup(k.name, k.modifiers.tighten(causal)) for k in original.keys)
    lists = {id(k.modifiers) for r in tightened.rules for k in r.keys}
    # one tightened list per distinct original list, shared as binding shares those
    assert len(lists) == len({k.modifiers for r in bound.rules for k in r.keys}) == 2
    _check_layout(tightened.layout({g: 1 + i % 3 for i, g in enumerate(names[:40])}))


# ------------------------------------------------------ context parallel


def _place_reference(
    groups: Sequence[str], calls: Sequence[patternc.ir.AttentionCall], sizes: Mapping[str, int | None]
) -> tuple[list[list[str]], dict[str, int]]:
    """Components and FLOPs per group, key group by key group."""
    live = {g for g in groups if sizes[g] is not None}
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            g = parent[g]
        return g

    offsets, at = {}, 0
    for g in groups:
        offsets[g] = at
        at += sizes[g] or 0
    flops = {g: 0 for g in groups}
    for call in calls:
        members = [g for g in (*call.queries, *call.key_names) if g in live]
        for other in members[1:]:
            parent[root(other)] = root(members[0])
        for q in call.queries:
            for k in call.keys:
                shift = offsets[k.name] - offsets[q]
                flops[q] += allowed_pairs(sizes[q] or 0, sizes[k.name] or 0, k.modifiers, shift)
    components: dict[str, list[str]] = {}
    for g in groups:
        if g in live:
            components.setdefault(root(g), []).append(g)
    return list(components.values()), flops


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_placement_components_and_flops_from_runs_equal_key_by_key(name: str) -> None:
    from patternc.distributed.placement import _components, _Facts, _group_flops

    rng = random.Random(name)
    for _ in range(6):
        sizes = _sizes(name, rng)
        for g in rng.sample(sorted(sizes), k=min(2, len(sizes))):
            sizes[g] = rng.choice([None, 0])  # cached groups and empty ones break the chains
        plan = patternc.compile(SOURCES[name]).patterns["default"].bind(list(sizes))
        live = {g for g in plan.groups if sizes[g] is not None}
        facts = _Facts(sizes, live)
        components, flops = _place_reference(plan.groups, plan.calls, sizes)
        assert _components(plan.groups, plan.calls, facts) == components, sizes
        assert _group_flops(plan.groups, plan.calls, sizes, facts) == flops, sizes


def test_placing_a_block_causal_family_reads_linear_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """``place`` reads each call's keys as slices of runs: the key groups
    it visits one by one, and the pair counts it computes, grow with the
    members, not with the ``M^2 / 2`` keys the calls read."""
    import patternc.distributed.placement as placement

    visited = [0]
    iterate, pairs = Keys.__iter__, placement.allowed_pairs

    def counted_iter(self: Keys) -> Iterator[KeyGroup]:
        for key in iterate(self):
            visited[0] += 1
            yield key

    def counted_pairs(*args: Any) -> int:
        visited[0] += 1
        return pairs(*args)

    monkeypatch.setattr(Keys, "__iter__", counted_iter)
    monkeypatch.setattr(placement, "allowed_pairs", counted_pairs)
    for count in (1000, 4000):
        sizes = _frames(count)
        plan = FRAMES.bind(list(sizes))
        visited[0] = 0
        result = placement.place(plan.groups, plan.calls, sizes, 8)
        assert visited[0] <= 4 * count + 10, (count, visited[0])
        assert result.tokens(0) + result.tokens(7) > 0
        assert sum(g.size or 0 for g in result.groups) == 4 + 3 * count
