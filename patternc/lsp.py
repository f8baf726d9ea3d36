"""``patternc lsp``: a language server for pattern files (pygls, the ``[lsp]`` extra).

Diagnostics as you type (the compiler's own, filtered by the ``select`` and
``ignore`` of ``[tool.patternc]`` in the nearest ``pyproject.toml``),
completion of group names and modifiers, hover with the rules a group is in,
go to a group's declaration, formatting (``patternc fmt``) and quick fixes
(each diagnostic's own fix, and ``# noqa`` for a warning); the answers come
from :mod:`patternc.editor`. Group sizes for hover come from the client's
initialization options, ``{"sizes": {"anchors": 1024}}``, else from
``[tool.patternc.sizes]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer
from pygls.workspace import ServerTextPosition, ServerTextRange, TextDocument

from patternc import editor
from patternc.diagnostics import Diagnostic
from patternc.project import Settings, SettingsError, find_settings

__all__ = ["build_server", "main"]

_KINDS = {
    "group": types.CompletionItemKind.Variable,
    "family": types.CompletionItemKind.Module,
    "modifier": types.CompletionItemKind.Keyword,
    "keyword": types.CompletionItemKind.Keyword,
}


def _range(document: TextDocument, line: int, column: int, end_line: int, end_column: int) -> types.Range:
    """An LSP range (0-based, in the client's units) of a 1-based span in characters."""
    server_range = ServerTextRange(
        ServerTextPosition(line - 1, column - 1), ServerTextPosition(end_line - 1, end_column - 1)
    )
    return document.range_to_client_units(server_range)


def _to_lsp(diagnostic: Diagnostic, document: TextDocument) -> types.Diagnostic:
    span = diagnostic.span
    if span is None:
        start = types.Position(line=0, character=0)
        where = types.Range(start=start, end=start)
    else:
        where = _range(document, span.line, span.column, span.end_line, span.end_column)
    message = diagnostic.message + (f"\nhint: {diagnostic.hint}" if diagnostic.hint else "")
    severity = (
        types.DiagnosticSeverity.Warning
        if diagnostic.code.startswith("W")
        else types.DiagnosticSeverity.Error
    )
    return types.Diagnostic(
        range=where,
        message=message,
        severity=severity,
        code=diagnostic.code,
        source="patternc",
    )


def _edit(document: TextDocument, edit: editor.TextEdit) -> types.TextEdit:
    return types.TextEdit(
        range=_range(document, edit.line, edit.column, edit.end_line, edit.end_column), new_text=edit.text
    )


def _cursor(document: TextDocument, position: types.Position) -> tuple[int, int]:
    """1-based (line, column) in characters of a client position."""
    server = document.position_from_client_units(position)
    return server.line + 1, server.character + 1


def build_server() -> LanguageServer:
    server = LanguageServer("patternc", "1")
    state: dict[str, Any] = {"sizes": {}}
    shown: set[str] = set()

    def settings(document: TextDocument) -> Settings:
        """``[tool.patternc]`` above the document, read anew each time (it may
        have changed); the defaults for an unsaved document, or when the table
        cannot be used (the client is told why, once)."""
        if not document.uri.startswith("file:"):
            return Settings()
        try:
            return find_settings(Path(document.path).parent)
        except SettingsError as error:
            if str(error) not in shown:
                shown.add(str(error))
                server.window_show_message(
                    types.ShowMessageParams(type=types.MessageType.Warning, message=f"patternc: {error}")
                )
            return Settings()

    def publish(uri: str) -> None:
        document = server.workspace.get_text_document(uri)
        found = editor.check(document.source, document.path, settings(document))
        server.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(uri=uri, diagnostics=[_to_lsp(d, document) for d in found])
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
        line, column = _cursor(document, params.position)
        items = [
            types.CompletionItem(label=c.label, kind=_KINDS[c.kind], detail=c.detail)
            for c in editor.completions(document.source, line, column)
        ]
        return types.CompletionList(is_incomplete=False, items=items)

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    def hover(params: types.HoverParams) -> types.Hover | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        line, column = _cursor(document, params.position)
        sizes = state["sizes"] or {k: v for k, v in settings(document).sizes.items() if v is not None}
        text = editor.hover(document.source, line, column, sizes)
        if text is None:
            return None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text))

    @server.feature(types.TEXT_DOCUMENT_DEFINITION)
    def definition(params: types.DefinitionParams) -> types.Location | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        line, column = _cursor(document, params.position)
        found = editor.declaration(document.source, line, column)
        if found is None:
            return None
        where = _range(document, found.line, found.column, found.line, found.end_column)
        return types.Location(uri=params.text_document.uri, range=where)

    @server.feature(types.TEXT_DOCUMENT_FORMATTING)
    def formatting(params: types.DocumentFormattingParams) -> list[types.TextEdit] | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        edits = editor.formatting(document.source, document.path)
        return None if edits is None else [_edit(document, e) for e in edits]

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix]),
    )
    def code_action(params: types.CodeActionParams) -> list[types.CodeAction]:
        document = server.workspace.get_text_document(params.text_document.uri)
        first, _ = _cursor(document, params.range.start)
        last, _ = _cursor(document, params.range.end)
        found = editor.check(document.source, document.path, settings(document))
        out = []
        for action in editor.code_actions(document.source, first, last, found):
            edit = types.WorkspaceEdit(
                changes={params.text_document.uri: [_edit(document, e) for e in action.edits]}
            )
            out.append(
                types.CodeAction(
                    title=action.title,
                    kind=types.CodeActionKind.QuickFix,
                    diagnostics=[_to_lsp(action.diagnostic, document)],
                    is_preferred=action.preferred,
                    edit=edit,
                )
            )
        return out

    return server


def main() -> int:
    build_server().start_io()
    return 0
