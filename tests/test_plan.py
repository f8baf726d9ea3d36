"""Plans: merged patterns, graph, layout, costs, JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
from conftest import EXAMPLES

import patternc
from patternc import TokenSpec
from patternc.export import to_dot, to_json

AB_SIZES = {"surface_anchors": 1024, "surface_queries": 4096, "volume_anchors": 1024, "volume_queries": 4096}


@pytest.fixture(scope="module")
def program() -> patternc.Program:
    return patternc.compile(EXAMPLES / "ab_upt.patc")


def test_compile_accepts_path_and_text(program: patternc.Program) -> None:
    assert program.filename == str(EXAMPLES / "ab_upt.patc")
    from_text = patternc.compile((EXAMPLES / "ab_upt.patc").read_text())
    assert from_text.filename is None
    assert {n: p.attention_patterns for n, p in from_text.patterns.items()} == {
        n: p.attention_patterns for n, p in program.patterns.items()
    }


def test_seed_patterns(program: patternc.Program) -> None:
    P = patternc.AttentionPattern
    assert program.patterns["self_anchor"].attention_patterns == [
        P(query_tokens=["surface_anchors", "surface_queries"], key_value_tokens=["surface_anchors"]),
        P(query_tokens=["volume_anchors", "volume_queries"], key_value_tokens=["volume_anchors"]),
    ]
    assert program.patterns["joint"].attention_patterns == [
        P(
            query_tokens=["surface_anchors", "surface_queries", "volume_anchors", "volume_queries"],
            key_value_tokens=["surface_anchors", "volume_anchors"],
        )
    ]


def test_rules_with_equal_keys_merge_in_first_rule_order() -> None:
    plan = patternc.compile("groups a b c d\nd -> a, b\nc -> c\nb, a -> b, a\n").patterns["default"]
    assert [(p.query_tokens, p.key_value_tokens) for p in plan.attention_patterns] == [
        (("a", "b", "d"), ("a", "b")),
        (("c",), ("c",)),
    ]
    assert len(plan.rules) == 3


def test_graph(program: patternc.Program) -> None:
    graph = program.patterns["cross_anchor"].graph()
    assert isinstance(graph, nx.DiGraph)
    assert list(graph.nodes) == list(program.groups)
    assert set(graph.edges) == {
        ("surface_anchors", "volume_anchors"),
        ("surface_queries", "volume_anchors"),
        ("volume_anchors", "surface_anchors"),
        ("volume_queries", "surface_anchors"),
    }
    assert graph.edges["volume_queries", "surface_anchors"]["call"] == 1
    assert all(graph.out_degree(n) >= 1 for n in graph.nodes)


def test_token_specs(program: patternc.Program) -> None:
    specs = program.patterns["joint"].token_specs({**AB_SIZES, "volume_anchors": None})
    assert specs[2] == TokenSpec("volume_anchors", None)
    assert [s.name for s in specs] == list(program.groups)


def test_sizes_errors(program: patternc.Program) -> None:
    plan = program.patterns["joint"]
    with pytest.raises(patternc.PatternError) as info:
        plan.layout({"surface_anchor": 3, "surface_queries": 1})
    text = str(info.value)
    assert "size given for unknown group `surface_anchor`" in text
    assert "did you mean `surface_anchors`?" in text
    assert "no size given for `surface_anchors`, `volume_anchors`, `volume_queries`" in text
    with pytest.raises(patternc.PatternError, match="must be an integer >= 0"):
        plan.layout({**AB_SIZES, "volume_queries": -1})


def test_layout_costs_and_access(program: patternc.Program) -> None:
    layout = program.patterns["self_anchor"].layout(AB_SIZES)
    assert [(s.name, s.offset) for s in layout.slots] == [
        ("surface_anchors", 0),
        ("surface_queries", 1024),
        ("volume_anchors", 5120),
        ("volume_queries", 6144),
    ]
    assert layout.n_tokens == 10240
    assert [(c.n_queries, c.n_keys) for c in layout.calls] == [(5120, 1024), (5120, 1024)]
    assert layout.launches == ((0, 1),)
    assert layout.density == pytest.approx(2 * 5120 * 1024 / 10240**2)
    assert layout.flops(192) == 4 * 2 * 5120 * 1024 * 192
    joint = program.patterns["joint"].layout(AB_SIZES)
    assert (joint.calls[0].query_access, joint.calls[0].key_access) == ("view", "gather")


def test_layout_with_cached_and_empty_groups() -> None:
    plan = patternc.compile("groups a q b\n* -> a, b\n").patterns["default"]
    layout = plan.layout({"a": None, "q": 5, "b": 0})
    (call,) = layout.calls
    assert call.query_tokens == ("q", "b")
    assert (call.n_queries, call.n_keys) == (5, 0)
    assert call.key_access == "view"  # only the cached `a` holds tokens
    assert layout.slot("a").cached and layout.slot("q").offset == 0
    gathered = plan.layout({"a": 2, "q": 3, "b": 4})
    assert gathered.calls[0].query_access == "view"  # all of a, q, b: one slice
    assert gathered.calls[0].key_access == "gather"  # a and b, with q between them


def test_layout_accepts_token_specs(program: patternc.Program) -> None:
    plan = program.patterns["joint"]
    specs = [TokenSpec(n, s) for n, s in AB_SIZES.items()]
    assert plan.layout(specs) == plan.layout(AB_SIZES)


def test_json_schema(program: patternc.Program) -> None:
    data = json.loads(to_json(program, AB_SIZES, dim=64))
    assert set(data) == {"schema", "version", "file", "groups", "types", "patterns"}
    assert data["types"] == {
        "surface_anchors": "surface",
        "surface_queries": "surface",
        "volume_anchors": "volume",
        "volume_queries": "volume",
    }
    assert data["schema"] == "patternc.plan" and data["version"] == 2
    assert [p["name"] for p in data["patterns"]] == ["self_anchor", "cross_anchor", "joint"]
    pattern = data["patterns"][0]
    assert set(pattern) == {"name", "rules", "attention_patterns", "types", "layout"}
    assert set(pattern["rules"][0]) == {"text", "line", "column", "queries", "keys_values", "key_modifiers"}
    assert pattern["attention_patterns"][0]["key_modifiers"] == [{"causal": False, "window": None}]
    assert pattern["rules"][0]["line"] == 5
    layout = pattern["layout"]
    assert set(layout) == {
        "tokens", "key_tokens", "key_ranges", "groups", "calls", "launches", "dim", "allowed_entries", "flops",
        "dense_flops", "density",
    }  # fmt: skip
    anchors = [g for g in layout["groups"] if g["name"].endswith("anchors")]
    assert layout["key_tokens"] == sum(g["size"] for g in anchors)  # no AB-UPT query is a key
    assert layout["key_ranges"] == [[g["offset"], g["offset"] + g["size"]] for g in anchors]
    assert set(layout["calls"][0]) == {
        "query_tokens",
        "key_value_tokens",
        "n_queries",
        "n_keys_values",
        "allowed_entries",
        "query_access",
        "key_value_access",
        "flops",
        "key_modifiers",
    }
    assert layout["flops"] == sum(c["flops"] for c in layout["calls"])
    assert layout["dense_flops"] == 4 * 10240 * 10240 * 64
    without = json.loads(to_json(program))
    assert all(p["layout"] is None for p in without["patterns"])


def test_json_is_deterministic(program: patternc.Program) -> None:
    again = patternc.compile(Path(program.filename or ""))
    assert to_json(program, AB_SIZES) == to_json(again, AB_SIZES)


def test_program_lookup_suggests(program: patternc.Program) -> None:
    with pytest.raises(KeyError, match="did you mean `joint`"):
        program["jiont"]


def test_dot(program: patternc.Program) -> None:
    dot = to_dot(program.patterns["self_anchor"])
    assert dot.startswith("digraph patternc {")
    assert "p0_surface_queries -> p0_call0;" in dot and "p0_call0 -> p0_surface_anchors;" in dot
    assert dot.count("->") == 6  # 4 query edges, 2 key edges: linear in groups, never q x k
