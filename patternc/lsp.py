"""``patternc lsp``: a language server for pattern files (pygls, the ``[lsp]`` extra).

Diagnostics as you type (the compiler's own), completion of group names
and modifiers, hover with the rules a group is in, and go to a group's
declaration; the answers come from :mod:`patternc.editor`. Group sizes for
hover come from the client's initialization options: ``{"sizes": {"anchors": 1024}}``.
"""

from __future__ import annotations

from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from patternc import editor
from patternc.diagnostics import Diagnostic

__all__ = ["build_server", "main"]

_KINDS = {
    "group": types.CompletionItemKind.Variable,
    "family": types.CompletionItemKind.Module,
    "modifier": types.CompletionItemKind.Keyword,
    "keyword": types.CompletionItemKind.Keyword,
}


def _to_lsp(diagnostic: Diagnostic) -> types.Diagnostic:
    span = diagnostic.span
    if span is None:
        start = end = types.Position(line=0, character=0)
    else:
        start = types.Position(line=span.line - 1, character=span.column - 1)
        end = types.Position(line=span.end_line - 1, character=span.end_column - 1)
    message = diagnostic.message + (f"\nhint: {diagnostic.hint}" if diagnostic.hint else "")
    severity = (
        types.DiagnosticSeverity.Warning
        if diagnostic.code.startswith("W")
        else types.DiagnosticSeverity.Error
    )
    return types.Diagnostic(
        range=types.Range(start=start, end=end),
        message=message,
        severity=severity,
        code=diagnostic.code,
        source="patternc",
    )


def build_server() -> LanguageServer:
    server = LanguageServer("patternc", "1")
    state: dict[str, Any] = {"sizes": {}}

    def publish(uri: str) -> None:
        document = server.workspace.get_text_document(uri)
        found = editor.check(document.source, document.path)
        server.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(uri=uri, diagnostics=[_to_lsp(d) for d in found])
        )

    @server.feature(types.INITIALIZE)
    def initialize(params: types.InitializeParams) -> None:
        options = params.initialization_options or {}
        if isinstance(options, dict):
            state["sizes"] = dict(options.get("sizes") or {})

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(params: types.DidOpenTextDocumentParams) -> None:
        publish(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(params: types.DidChangeTextDocumentParams) -> None:
        publish(params.text_document.uri)

    @server.feature(
        types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=["[", ",", " "])
    )
    def completion(params: types.CompletionParams) -> types.CompletionList:
        document = server.workspace.get_text_document(params.text_document.uri)
        pos = params.position
        items = [
            types.CompletionItem(label=c.label, kind=_KINDS[c.kind], detail=c.detail)
            for c in editor.completions(document.source, pos.line + 1, pos.character + 1)
        ]
        return types.CompletionList(is_incomplete=False, items=items)

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    def hover(params: types.HoverParams) -> types.Hover | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        pos = params.position
        text = editor.hover(document.source, pos.line + 1, pos.character + 1, state["sizes"])
        if text is None:
            return None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text))

    @server.feature(types.TEXT_DOCUMENT_DEFINITION)
    def definition(params: types.DefinitionParams) -> types.Location | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        pos = params.position
        found = editor.declaration(document.source, pos.line + 1, pos.character + 1)
        if found is None:
            return None
        start = types.Position(line=found.line - 1, character=found.column - 1)
        end = types.Position(line=found.line - 1, character=found.end_column - 1)
        return types.Location(uri=params.text_document.uri, range=types.Range(start=start, end=end))

    return server


def main() -> int:
    build_server().start_io()
    return 0
