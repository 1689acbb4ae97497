#!/usr/bin/env bash
# Make sure the sandbox image exists: start/check the Docker daemon, then build
# images/sandbox only when sandstream/sandbox:latest is missing or is not the
# image of the current tag (Dockerfile or CLI version changed).
# Prints the image name (sandstream/sandbox:<cli-version>-<hash>) as the last
# line of stdout. Idempotent; a no-op run takes well under a second.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER

bash "$REPO/.ci/docker.sh"

want="$(bash "$REPO/images/sandbox/build.sh" --print-name)"
want_id="$("$DOCKER" image inspect -f '{{.Id}}' "$want" 2>/dev/null || true)"
latest_id="$("$DOCKER" image inspect -f '{{.Id}}' sandstream/sandbox:latest 2>/dev/null || true)"
if [ -n "$want_id" ] && [ "$want_id" = "$latest_id" ]; then
    echo "image.sh: $want is up to date" >&2
    echo "$want"
    exit 0
fi

exec bash "$REPO/images/sandbox/build.sh"
