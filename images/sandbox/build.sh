#!/usr/bin/env bash
# Build the sandbox image sandstream/sandbox:<cli-version>-<hash> and tag it
# sandstream/sandbox:latest. Prints the image name as the last line of stdout
# (everything else goes to stderr).
#
# Steps, each skipped when already done:
#   1. base image sandstream/debian-base:bookworm: `debootstrap --variant=minbase
#      bookworm` -> tarball cached in $CACHE -> `docker import`. A fresh docker
#      daemon (new /var/lib/docker) re-imports the cached tarball in seconds;
#      debootstrap (~35 s) runs only when the tarball is missing.
#   2. Claude Code CLI: `npm install @anthropic-ai/claude-code@VERSION` on the
#      host into $CACHE/claude-code-VERSION; only the native binary is used.
#   3. `docker build --network host` from a temporary context (Dockerfile +
#      hard link to the binary), unless the tagged image already exists.
#
# The tag's hash covers the Dockerfile, the CLI version and the base image
# name, so editing the Dockerfile or bumping the CLI gives a new tag and a
# rebuild, and re-running with nothing changed is a no-op.
#
# Usage: build.sh [--print-name]   (--print-name: print the image name, build nothing)
# Environment:
#   SANDSTREAM_CACHE      cache directory (default <repo>/.cache)
#   CLAUDE_CODE_VERSION   CLI version (default 2.1.328)
#   DOCKER                docker client (default /usr/bin/docker if present, the
#                         client shipped with Debian's daemon; else `docker`)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${SANDSTREAM_CACHE:-$REPO/.cache}"
CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.328}"
BASE_IMAGE="sandstream/debian-base:bookworm"
REPO_NAME="sandstream/sandbox"
SUITE="bookworm"
BASE_TAR="$CACHE/debian-$SUITE-minbase.tar"
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
# The legacy builder: it uses local images (our imported base) directly and
# honours --network host; the 20.10 client/daemon pair needs no buildx.
export DOCKER_BUILDKIT=0
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "build.sh: $*" >&2; }

hash="$( { cat "$HERE/Dockerfile"; echo "claude-code=$CLAUDE_CODE_VERSION"; echo "base=$BASE_IMAGE"; } \
    | sha256sum | cut -c1-12)"
IMAGE="$REPO_NAME:$CLAUDE_CODE_VERSION-$hash"

if [ "${1:-}" = "--print-name" ]; then
    echo "$IMAGE"
    exit 0
fi

t0=$EPOCHREALTIME
elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
mkdir -p "$CACHE"

# --- 0. already built? ------------------------------------------------------
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    "$DOCKER" tag "$IMAGE" "$REPO_NAME:latest"
    log "$IMAGE already exists; nothing to build ($(elapsed) s)"
    echo "$IMAGE"
    exit 0
fi

# --- 1. base image ----------------------------------------------------------
if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base $BASE_IMAGE exists"
else
    if [ ! -s "$BASE_TAR" ]; then
        [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
        command -v debootstrap >/dev/null || { log "debootstrap missing: run .ci/docker.sh"; exit 1; }
        root="$CACHE/debootstrap-$SUITE.tmp"
        rm -rf "$root"
        log "debootstrap --variant=minbase $SUITE (log: $CACHE/debootstrap.log)"
        # No mirror argument: debootstrap's built-in default is reachable here.
        if ! debootstrap --variant=minbase "$SUITE" "$root" >"$CACHE/debootstrap.log" 2>&1; then
            tail -n 20 "$CACHE/debootstrap.log" >&2
            log "debootstrap failed"; exit 1
        fi
        # Trim what a container never needs (apt lists come back with
        # apt-get update in the Dockerfile).
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
               "$root"/debootstrap
        tar --numeric-owner -C "$root" -cf "$BASE_TAR.tmp" .
        mv -f "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$root"
        log "base tarball cached: $BASE_TAR ($(du -h "$BASE_TAR" | cut -f1), $(elapsed) s)"
    else
        log "using cached base tarball $BASE_TAR"
    fi
    "$DOCKER" import - "$BASE_IMAGE" <"$BASE_TAR" >/dev/null
    log "imported $BASE_IMAGE ($(elapsed) s)"
fi

# --- 2. Claude Code CLI on the host -------------------------------------------
cli_dir="$CACHE/claude-code-$CLAUDE_CODE_VERSION"
cli_bin="$cli_dir/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
if [ -x "$cli_bin" ]; then
    log "using cached Claude Code $CLAUDE_CODE_VERSION"
else
    command -v npm >/dev/null || { log "npm missing (apt-get install npm)"; exit 1; }
    log "npm install @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
    rm -rf "$cli_dir.tmp"
    mkdir -p "$cli_dir.tmp"
    # --ignore-scripts: the postinstall only links the platform binary into
    # bin/ (and wants Node >= 22); we take the binary from its own package.
    # npm's "EBADENGINE" warning about Node >= 22 is harmless.
    npm install --prefix "$cli_dir.tmp" --no-audit --no-fund --ignore-scripts --loglevel=error \
        "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2
    tmp_bin="$cli_dir.tmp/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
    [ -x "$tmp_bin" ] || { log "npm install gave no linux-x64 binary at $tmp_bin"; exit 1; }
    rm -rf "$cli_dir"
    mv "$cli_dir.tmp" "$cli_dir"
fi
got="$("$cli_bin" --version 2>/dev/null | awk '{print $1}')"
if [ "$got" != "$CLAUDE_CODE_VERSION" ]; then
    log "cached binary says '$got', expected $CLAUDE_CODE_VERSION: delete $cli_dir and retry"; exit 1
fi

# --- 3. docker build ----------------------------------------------------------
ctx="$(mktemp -d "$CACHE/sandbox-context.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
cp "$HERE/Dockerfile" "$ctx/Dockerfile"
# A hard link (same file system) instead of copying 373 MB; cp if that fails.
ln "$cli_bin" "$ctx/claude" 2>/dev/null || cp "$cli_bin" "$ctx/claude"
log "docker build $IMAGE"
"$DOCKER" build --network host \
    --build-arg "CLAUDE_CODE_VERSION=$CLAUDE_CODE_VERSION" \
    --label "io.sandstream.build-hash=$hash" \
    -t "$IMAGE" -t "$REPO_NAME:latest" "$ctx" >&2
log "built $IMAGE in $(elapsed) s ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$IMAGE"
