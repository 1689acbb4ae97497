#!/usr/bin/env bash
# Make sure a Docker daemon is installed, running and reachable; install
# debootstrap too (images/sandbox/build.sh needs it for the base image), and
# docker-compose to validate compose.yaml.
#
# Idempotent: every step is skipped when already done. Safe to run as often as
# you like (CI, `make image`, by hand). Needs root on a fresh Debian 12 machine.
#
# Environment:
#   SANDSTREAM_CACHE   cache directory (default: <repo>/.cache); dockerd.log goes there
#   DOCKER_WAIT        seconds to wait for the daemon (default: 60)
#
# Client/daemon note: Debian's docker.io is 20.10 (API 1.41) and ships its own
# client as /usr/bin/docker. This machine also has a Docker 28 client in
# /usr/local/bin/docker, which comes first in PATH. The 28 client negotiates the
# API version down (it was checked to work against the 20.10 daemon for info,
# run, exec, images, build with the legacy builder), so nothing needs to be
# forced. Should a client ever refuse the daemon ("client version X is too
# new"), this script exports nothing; instead callers can set
# DOCKER_API_VERSION=1.41. Our own scripts (images/sandbox/build.sh) prefer
# /usr/bin/docker, the client shipped with the daemon, to rule the question out.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SANDSTREAM_CACHE:-$REPO/.cache}"
WAIT="${DOCKER_WAIT:-60}"

log() { echo "docker.sh: $*" >&2; }

# The client we check the daemon with: the one that came with the daemon if
# present, else whatever is in PATH.
docker_client() {
    if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || true; fi
}

# --- 1. packages ------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
# docker-compose (1.29) only validates compose.yaml in the tests; there is no compose plugin.
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing ${missing[*]} and not root: install them first"; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${missing[*]}"
    # Try without an update first (fast when the lists are fresh); update only
    # if that fails.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

DOCKER="$(docker_client)"
if [ -z "$DOCKER" ]; then log "no docker client found"; exit 1; fi

# --- 2. daemon ----------------------------------------------------------------
if "$DOCKER" info >/dev/null 2>&1; then
    log "daemon already running ($("$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
    exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    # Somebody started it and it is still coming up: just wait below.
    log "dockerd process exists but does not answer yet; waiting"
else
    if [ "$(id -u)" != 0 ]; then log "daemon not running and not root: cannot start dockerd"; exit 1; fi
    mkdir -p "$CACHE"
    # A stale pid file from a killed daemon makes dockerd refuse to start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    # No bridge, no iptables: containers here run with network "none" (or host
    # for builds), and this machine may have no iptables/netfilter at all.
    # setsid + nohup: the daemon outlives this script and its session.
    log "starting dockerd (log: $CACHE/dockerd.log)"
    setsid nohup dockerd --bridge=none --iptables=false \
        >>"$CACHE/dockerd.log" 2>&1 </dev/null &
    disown || true
fi

for ((i = 0; i < WAIT * 4; i++)); do
    if "$DOCKER" info >/dev/null 2>&1; then
        log "daemon up after ~$((i / 4)) s (pid $(cat /var/run/docker.pid 2>/dev/null || echo '?'))"
        exit 0
    fi
    sleep 0.25
done

log "ERROR: docker daemon did not answer within ${WAIT}s. Last lines of $CACHE/dockerd.log:"
tail -n 20 "$CACHE/dockerd.log" >&2 2>/dev/null || true
exit 1
