// Starts `python -m patternc lsp` for pattern files (.patc); everything else is the server's.
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const settings = vscode.workspace.getConfiguration("patternc");
  const server = { command: settings.get("python", "python3"), args: ["-m", "patternc", "lsp"] };
  client = new LanguageClient(
    "patternc",
    "patternc",
    { run: server, debug: server },
    {
      documentSelector: [{ language: "patternc" }],
      initializationOptions: { sizes: settings.get("sizes", {}) },
    }
  );
  context.subscriptions.push({ dispose: () => client && client.stop() });
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
