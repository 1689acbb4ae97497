#!/usr/bin/env bash
# Idempotent installer of the pinned Claude Code CLI for host-side tests.
#
# Installs @anthropic-ai/claude-code@$CLAUDE_CLI_VERSION into
# ${SANDSTREAM_CACHE:-<repo>/.cache}/claude-cli (only when the native binary
# is missing or of another version) and prints the absolute path of the
# native linux-x64 binary on stdout. Everything else goes to stderr.
# Exits non-zero, with the reason on stderr, when the CLI cannot be installed.
set -euo pipefail

CLAUDE_CLI_VERSION="${CLAUDE_CLI_VERSION:-2.1.328}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${SANDSTREAM_CACHE:-$repo_root/.cache}"
prefix="$cache/claude-cli"
bin="$prefix/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
stamp="$prefix/.installed-version"

if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$CLAUDE_CLI_VERSION" ]]; then
    echo "$bin"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "claude_cli.sh: npm not found; install Node.js/npm to fetch the Claude Code CLI" >&2
    exit 2
fi

mkdir -p "$prefix"
# A lock keeps parallel test runs from installing into the same prefix at once.
exec 9>"$prefix/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
# Re-check under the lock: another process may have finished the install.
if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$CLAUDE_CLI_VERSION" ]]; then
    echo "$bin"
    exit 0
fi

echo "claude_cli.sh: installing @anthropic-ai/claude-code@$CLAUDE_CLI_VERSION into $prefix" >&2
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CLI_VERSION" >&2

if [[ ! -x "$bin" ]]; then
    echo "claude_cli.sh: npm finished but $bin is missing (not linux-x64?)" >&2
    exit 3
fi
echo "$CLAUDE_CLI_VERSION" >"$stamp"
echo "$bin"
