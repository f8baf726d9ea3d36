"""Editor support: the answers (patternc.editor) and the language server
(patternc lsp, driven by pygls's client over stdio)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from patternc import editor

SOURCE = """groups surface_anchors surface_queries volume_anchors volume_queries doc*
pattern self_anchor {
    surface_* -> surface_anchors
    volume_*  -> volume_anchors
    doc* -> self
}
pattern docs {
    surface_*, volume_* -> surface_anchors, volume_anchors[causal]
    doc* -> self [causal]
}
"""


def test_check_reports_the_compiler_diagnostics() -> None:
    broken = SOURCE.replace("-> volume_anchors\n", "-> volume_anchor\n")
    found = editor.check(broken)
    assert any(
        d.code == "E201" and "volume_anchor" in d.message and d.hint and "volume_anchors" in d.hint
        for d in found
    )
    unknown = next(d for d in found if d.code == "E201")
    assert unknown.span is not None and unknown.span.line == 4
    assert not [d for d in editor.check(SOURCE) if d.is_error]
    assert editor.check("groups a b\n* -> *")[0].code == "W103"  # warnings too


def test_completion_offers_groups_then_modifiers_inside_brackets() -> None:
    names = {c.label: c.kind for c in editor.completions(SOURCE, 3, 18)}
    assert names["surface_anchors"] == "group" and names["doc*"] == "family" and names["self"] == "keyword"
    inside = [c.label for c in editor.completions("groups a\na -> a[", 2, 8)]
    assert inside == ["causal", "window"]


def test_hover_shows_the_rules_and_the_size() -> None:
    text = editor.hover(SOURCE, 3, 20, {"surface_anchors": 1024})
    assert text is not None
    assert "**surface_anchors**: 1024 tokens" in text
    assert "pattern `self_anchor`" in text and "query in `surface_* -> surface_anchors`" in text
    assert "key of `surface_*, volume_* -> surface_anchors, volume_anchors[causal]`" in text
    assert editor.hover(SOURCE, 2, 3) is None  # `pattern` is a keyword, not a group


def test_go_to_declaration() -> None:
    found = editor.declaration(SOURCE, 4, 20)  # volume_anchors on line 4
    assert found is not None and (found.line, found.column) == (1, SOURCE.index("volume_anchors") + 1)
    assert found.end_column - found.column == len("volume_anchors")
    assert editor.declaration(SOURCE, 9, 6) == editor.declared_groups(SOURCE)["doc*"]


pytest.importorskip("pygls")


def test_language_server_over_stdio(tmp_path: Path) -> None:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    async def session() -> tuple[list[types.Diagnostic], object, object, object]:
        client = LanguageClient("test", "1")
        published: list[types.PublishDiagnosticsParams] = []
        received = asyncio.Event()

        @client.feature(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def on_diagnostics(params: types.PublishDiagnosticsParams) -> None:
            published.append(params)
            received.set()

        await client.start_io(sys.executable, "-m", "patternc", "lsp")
        await client.initialize_async(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(),
                initialization_options={"sizes": {"volume_anchors": 512}},
            )
        )
        client.initialized(types.InitializedParams())
        uri = (tmp_path / "model.pc").as_uri()
        broken = SOURCE.replace("-> volume_anchors\n", "-> volume_anchor\n")
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(uri=uri, language_id="patternc", version=1, text=broken)
            )
        )
        await asyncio.wait_for(received.wait(), 30)
        doc = types.TextDocumentIdentifier(uri=uri)
        completion = await client.text_document_completion_async(
            types.CompletionParams(text_document=doc, position=types.Position(line=2, character=17))
        )
        hover = await client.text_document_hover_async(
            types.HoverParams(
                text_document=doc,
                position=types.Position(line=0, character=SOURCE.index("volume_anchors") + 2),
            )
        )
        definition = await client.text_document_definition_async(
            types.DefinitionParams(text_document=doc, position=types.Position(line=2, character=20))
        )
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        return published[-1].diagnostics, completion, hover, definition

    diagnostics, completion, hover, definition = asyncio.run(session())
    unknown = [d for d in diagnostics if d.code == "E201"]
    assert (
        unknown and unknown[0].range.start.line == 3 and "did you mean `volume_anchors`" in unknown[0].message
    )
    assert "surface_anchors" in {item.label for item in completion.items}  # type: ignore[attr-defined]
    assert "volume_anchors**: 512 tokens" in hover.contents.value  # type: ignore[attr-defined]
    assert definition.range.start.line == 0  # type: ignore[attr-defined]


def test_vscode_extension_and_grammar_fit_together() -> None:
    import json
    import re

    folder = Path(__file__).resolve().parent.parent / "editors" / "vscode"
    package = json.loads((folder / "package.json").read_text())
    (grammar_ref,) = package["contributes"]["grammars"]
    grammar = json.loads((folder / grammar_ref["path"]).read_text())
    assert grammar["scopeName"] == grammar_ref["scopeName"]
    assert package["contributes"]["languages"][0]["extensions"] == [".pc"]
    assert '"-m", "patternc", "lsp"' in (folder / "extension.js").read_text()
    names = {p["name"]: p["match"] for p in grammar["patterns"] if "match" in p}
    keyword = re.compile(names["keyword.control.patternc"])
    assert keyword.findall("groups a b\npattern p {") == ["groups", "pattern"]
    modifier = re.compile(grammar["repository"]["modifiers"]["patterns"][0]["match"])
    assert modifier.findall("[causal, window 4]") == ["causal", "window"]
