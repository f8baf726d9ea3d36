"""Editor support: the answers (patternc.editor) and the language server
(patternc lsp, driven by pygls's client over stdio)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from patternc import editor
from patternc.diagnostics import Span

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
    inside = {c.label: c.kind for c in editor.completions("groups a\na -> a[", 2, 8)}
    modifiers = ("causal", "window", "back", "ahead", "dilate", "across")
    relations = ("same", "before", "upto", "near", "kernel")
    assert inside == {**dict.fromkeys(modifiers, "modifier"), **dict.fromkeys(relations, "member relation")}


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


def _apply(text: str, edits: list[editor.TextEdit] | tuple[editor.TextEdit, ...]) -> str:
    """``text`` with non-overlapping edits made (1-based positions, lines split at newline)."""
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    out = text
    for e in sorted(edits, key=lambda e: (e.line, e.column), reverse=True):
        a, b = starts[e.line - 1] + e.column - 1, starts[e.end_line - 1] + e.end_column - 1
        out = out[:a] + e.text + out[b:]
    return out


@pytest.mark.parametrize(
    "text",
    [
        "groups a b\na->a,b[causal]\n\n\n\nb  ->  b",  # no final newline
        "groups a b\na -> a\nb->b\n\n\n",  # trailing blank lines
        "\n\ngroups a b\r\na -> b  # keep me\r\nb->a",  # CRLF, leading blanks, a comment
        "groups a b\npattern p {\na -> b\n        b -> a\n}\npattern q {\n    a, b -> a, b\n}\n",
    ],
)
def test_formatting_edits_give_what_fmt_writes(text: str) -> None:
    from patternc.fmt import format_source

    edits = editor.formatting(text)
    assert edits and _apply(text, edits) == format_source(text)
    assert editor.formatting(format_source(text)) == []


def test_formatting_leaves_unchanged_lines_alone_and_files_with_errors() -> None:
    text = "groups a b\na -> b\n\n\nb->a\n"
    assert editor.formatting(text) == [editor.TextEdit(4, 1, 6, 1, "b -> a\n")]  # lines 1-3 kept
    assert editor.formatting("groups a\na -> nope\n") is None


@dataclass(frozen=True)
class _Edit:
    span: Span
    replacement: str


@dataclass(frozen=True)
class _Fix:
    title: str
    edits: tuple[_Edit, ...]


@dataclass(frozen=True)
class _Fixable:
    """A diagnostic that carries a machine-applicable fix (``fix``: a title and
    edits of a span and a replacement each), as the compiler gives them."""

    code: str
    span: Span
    fix: _Fix

    @property
    def is_error(self) -> bool:
        return self.code.startswith("E")


def test_code_actions_offer_a_diagnostics_own_fix() -> None:
    text = "groups anchors queries\nqueries -> anchor\nanchors -> self\n"
    span = Span(2, 12, 2, 18)
    rename = _Fixable("E201", span, _Fix("replace `anchor` by `anchors`", (_Edit(span, "anchors"),)))
    (action,) = editor.code_actions(text, 2, 2, [rename])  # type: ignore[list-item]
    assert action.title == "replace `anchor` by `anchors`" and action.preferred
    assert action.diagnostic is rename
    assert _apply(text, action.edits) == text.replace("-> anchor\n", "-> anchors\n")
    assert editor.code_actions(text, 3, 3, [rename]) == []  # not on the requested lines


def test_code_actions_silence_a_warning_on_its_line() -> None:
    text = "groups a b c\na, b -> a, b [causal]   \nc -> c, a\n"  # trailing blanks go
    (w102,) = [d for d in editor.check(text) if d.code == "W102"]
    silence = [a for a in editor.code_actions(text, 2) if a.title == "silence W102 on this line"]
    assert len(silence) == 1 and not silence[0].preferred and silence[0].diagnostic == w102
    fixed = _apply(text, silence[0].edits)
    assert fixed.splitlines()[1] == "a, b -> a, b [causal]  # noqa: W102"
    assert not [d for d in editor.check(fixed) if d.code == "W102"]
    # a line with a noqa list gets the code added to it; a bare noqa silences all already
    listed = "groups a b q  # noqa: W103\na, b -> a, b\nq -> a\n"
    (w101,) = [d for d in editor.check(listed) if d.code == "W101"]
    (action,) = [a for a in editor.code_actions(listed, 1) if a.diagnostic == w101]
    assert _apply(listed, action.edits).splitlines()[0] == "groups a b q  # noqa: W103, W101"
    assert [d.code for d in editor.check(_apply(listed, action.edits))] == []
    assert editor.code_actions("groups a b c\na, b -> a, b [causal]  # noqa\nc -> c, a\n", 2) == []


def test_code_actions_of_a_real_diagnostic_without_a_fix_are_only_the_silencing() -> None:
    """Errors get the compiler's fix when it has one, and never a noqa."""
    text = SOURCE.replace("-> volume_anchors\n", "-> volume_anchor\n")
    (unknown,) = [d for d in editor.check(text) if d.code == "E201"]
    actions = editor.code_actions(text, 4)
    assert all(a.preferred and a.diagnostic == unknown for a in actions)
    assert len(actions) == (0 if getattr(unknown, "fix", None) is None else 1)


def test_check_applies_the_projects_settings() -> None:
    from patternc.project import Settings

    text = "groups a b c\na, b -> a, b [causal]\nc -> self\n"
    assert [d.code for d in editor.check(text)] == ["W102"]
    assert editor.check(text, settings=Settings(ignore=("W1",))) == []


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
    assert package["contributes"]["languages"][0]["extensions"] == [".patc"]  # .pc is pkg-config's too
    assert '"-m", "patternc", "lsp"' in (folder / "extension.js").read_text()
    names = {p["name"]: p["match"] for p in grammar["patterns"] if "match" in p}
    keyword = re.compile(names["keyword.control.patternc"])
    assert keyword.findall("groups a b\npattern p {") == ["groups", "pattern"]
    modifier = re.compile(grammar["repository"]["modifiers"]["patterns"][0]["match"])
    assert modifier.findall("[causal, window 4]") == ["causal", "window"]
    assert modifier.findall("[back 3, ahead 1, dilate 2, across]") == ["back", "ahead", "dilate", "across"]


def test_formatting_and_quick_fixes_over_stdio(tmp_path: Path) -> None:
    """textDocument/formatting and textDocument/codeAction, and the project's
    ``[tool.patternc]`` applied to the published diagnostics."""
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    (tmp_path / "pyproject.toml").write_text('[tool.patternc]\nignore = ["W101"]\n')
    messy = "groups a b c q\na, b->a,b [causal]\n\n\nc -> c, a\nq -> a\n"  # W101 (ignored), W102
    broken = SOURCE.replace("-> volume_anchors\n", "-> volume_anchor\n")
    overlap = "groups a b c\na -> a, b\nb, c -> c\na -> c\n"  # E302 on line 4

    async def session() -> dict[str, object]:
        client = LanguageClient("test", "1")
        published: dict[str, list[types.Diagnostic]] = {}
        arrived = asyncio.Condition()

        @client.feature(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        async def on_diagnostics(params: types.PublishDiagnosticsParams) -> None:
            async with arrived:
                published[params.uri] = params.diagnostics
                arrived.notify_all()

        await client.start_io(sys.executable, "-m", "patternc", "lsp")
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
        client.initialized(types.InitializedParams())
        out: dict[str, object] = {}
        for name, text in (("messy.patc", messy), ("broken.patc", broken), ("overlap.patc", overlap)):
            uri = (tmp_path / name).as_uri()
            client.text_document_did_open(
                types.DidOpenTextDocumentParams(
                    text_document=types.TextDocumentItem(
                        uri=uri, language_id="patternc", version=1, text=text
                    )
                )
            )
            async with arrived:
                await asyncio.wait_for(arrived.wait_for(lambda uri=uri: uri in published), 30)
            doc = types.TextDocumentIdentifier(uri=uri)
            out[name + " diagnostics"] = published[uri]
            out[name + " formatting"] = await client.text_document_formatting_async(
                types.DocumentFormattingParams(
                    text_document=doc, options=types.FormattingOptions(tab_size=4, insert_spaces=True)
                )
            )
            line = {"messy.patc": 1, "broken.patc": 3, "overlap.patc": 3}[name]
            where = types.Range(
                start=types.Position(line=line, character=0), end=types.Position(line=line, character=3)
            )
            out[name + " actions"] = await client.text_document_code_action_async(
                types.CodeActionParams(
                    text_document=doc,
                    range=where,
                    context=types.CodeActionContext(diagnostics=published[uri]),
                )
            )
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        return out

    out = asyncio.run(session())
    assert [d.code for d in out["messy.patc diagnostics"]] == ["W102"]  # type: ignore[attr-defined]
    edits = list(out["messy.patc formatting"])  # type: ignore[call-overload]
    assert edits
    lines = messy.split("\n")
    for edit in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character), reverse=True):
        start, end = edit.range.start, edit.range.end
        assert start.character == 0 and end.character == 0  # whole lines
        lines[start.line : end.line] = edit.new_text.split("\n")[:-1]
    from patternc.fmt import format_source

    assert "\n".join(lines) == format_source(messy)
    assert out["broken.patc formatting"] is None  # a file with errors is not reformatted

    actions = list(out["messy.patc actions"])  # type: ignore[call-overload]
    silence = [a for a in actions if a.title == "silence W102 on this line"]
    assert len(silence) == 1 and silence[0].kind == types.CodeActionKind.QuickFix
    (edit,) = silence[0].edit.changes[(tmp_path / "messy.patc").as_uri()]
    assert edit.new_text == "  # noqa: W102" and edit.range.start.line == 1
    assert silence[0].diagnostics[0].code == "W102"
    renames = list(out["broken.patc actions"])  # type: ignore[call-overload]
    assert all(a.diagnostics[0].code == "E201" for a in renames)
    if renames:  # diagnostics that carry their fix: the "did you mean" is one edit
        (rename,) = renames
        (edit,) = rename.edit.changes[(tmp_path / "broken.patc").as_uri()]
        assert edit.new_text == "volume_anchors" and rename.is_preferred
        assert (edit.range.start.line, edit.range.start.character) == (
            3,
            broken.splitlines()[3].index("volume_anchor"),
        )

    # the compiler's own fixes (on diagnostics that carry one): applied, the problem is gone
    from patternc.diagnostics import Diagnostic

    if "fix" not in Diagnostic.__dataclass_fields__:
        return
    for name, text, code in (("messy.patc", messy, "W102"), ("overlap.patc", overlap, "E302")):
        (own,) = [a for a in out[name + " actions"] if a.is_preferred]  # type: ignore[attr-defined]
        fixed = _apply_lsp(text, own.edit.changes[(tmp_path / name).as_uri()])
        assert code not in {d.code for d in editor.check(fixed)}, fixed


def _apply_lsp(text: str, edits: object) -> str:
    """``text`` with LSP text edits made (0-based lines and characters, ASCII text)."""
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    out = text
    for e in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character), reverse=True):  # type: ignore[attr-defined]
        a = starts[e.range.start.line] + e.range.start.character
        b = starts[e.range.end.line] + e.range.end.character
        out = out[:a] + e.new_text + out[b:]
    return out
