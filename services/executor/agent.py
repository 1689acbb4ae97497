"""The agent run, as pure functions: command line, environment, in-sandbox script, parsing.

Nothing here does I/O. The executor (``service.py``) runs :func:`wrapper_script` inside the
sandbox through the driver and feeds what comes back to :class:`Transcript` and
:func:`parse_collected`.

How a run looks inside the sandbox. Two users take part: the agent (uid 1000, the CLI and
all it runs) and the keeper (:data:`~shared.sandbox.KEEPER_UID`, no capabilities), who keeps
the books in :data:`KEEPER_DIR`, a tmpfs of its own that the agent can neither read nor fill.
The agent can do anything its user can: trace the CLI, write its run folder, chmod its files.
So what the result says about the run's changes comes from the keeper; what the CLI reports
(its transcript, its result line, its exit status) stays the agent's word, and is labelled so
in docs/security.md. The model usage comes from the model proxy, outside the sandbox.

1. ``follow`` (keeper, one exec per attach): records the workspace as a git tree in a private
   repository (``KEEPER_DIR/git``, ``/workspace`` as its work tree; ``base`` holds the tree
   id) unless it was recorded or the agent has started, then makes :data:`GO_FILE` (its
   own, in the sticky ``/tmp``) and prints ``<nonce>.ready``.
2. ``start`` (agent, sent at the same time): socat bridges ``127.0.0.1:<port>`` to the model
   proxy's Unix socket, fully detached, while the keeper records; then it waits for the
   keeper's file. ``mkdir RUN_DIR`` is the lock: the first start runs the agent; any later
   one (a redelivery, a restarted executor) finds it and does nothing. So the agent runs at
   most once per sandbox, whatever happens to the executor, and never before the workspace
   was recorded (nothing of the agent's can make the keeper's file). The CLI runs in its
   own session (``setsid``), reads the prompt from a file (argv strings are limited to
   128 KiB), writes stream-json to ``out.jsonl``, stderr to ``err.log``, and its exit status
   to ``exit`` when done.
3. ``follow`` goes on: it follows ``out.jsonl`` from a given line (``tail -f --pid``, on a
   descriptor it checked is a regular file of the agent's, so a link to one of the keeper's
   own files is never read out) until the run has ended (the run wrapper then stops every
   process of the agent's user), then says whether any is left (``<nonce>.quiet``: none,
   the executor packs at once; ``<nonce>.ended``: the executor stops them first, the keeper
   waits until they are gone), then prints a block marked by a per-exec random nonce:
   exit code, OOM-kill count, changed files and the diff against ``base``, closed by
   ``<nonce>.done``. The nonce is in the keeper's environment, which the agent cannot read,
   so the agent cannot end the stream early or forge the block.
4. ``patch`` (keeper, only for a task with ``output.branch``): the changes in full, as a
   binary diff, for the branch the executor makes outside the sandbox; ``artifacts``
   (keeper, for ``output.artifacts``): the matching files as a tar.gz; ``pack`` (agent, its
   processes all stopped): the workspace and the CLI's session files, for a follow-up.
"""

from __future__ import annotations

import base64
import binascii
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from shared import launch, sandbox
from shared.events import TaskSpec

RUN_DIR: Final = "/tmp/.sandstream-run"
"""The agent's run folder (its own user's): prompt, output, status, as the CLI reports them."""
KEEPER_DIR: Final = sandbox.KEEPER_DIR
NONCE_VAR: Final = "SANDSTREAM_NONCE"
SANDBOX_UID: Final = sandbox.SANDBOX_UID
HOME_DIR: Final = "/tmp/.sandstream-home"
GO_FILE: Final = "/tmp/.sandstream-recorded"
"""Made by the keeper once the workspace is recorded; the agent's start waits for it (a file
of the keeper's user: /tmp is sticky, so the agent can neither make one first, nor remove
it)."""
CONFIG_DIR: Final = "/tmp/.sandstream-config"
"""The run's configuration files (settings, MCP servers, appended system prompt)."""
APPEND_FILE: Final = "append-system-prompt.md"
SETTINGS_FILE: Final = "settings.json"
MCP_FILE: Final = "mcp.json"
CA_FILE: Final = "ca.pem"
"""The installation's extra certificates (``SANDSTREAM_SANDBOX_CA_FILE``), for a task with
``network``: ``NODE_EXTRA_CA_CERTS`` (the CLI's own fetches, node tools)."""
CA_BUNDLE: Final = "ca-bundle.pem"
"""The image's certificates and the extra ones, made by the start script: what OpenSSL-based
tools (curl, git, pip, requests) are pointed at, as their variables replace, not add."""
CA_BUNDLE_VARS: Final = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "REQUESTS_CA_BUNDLE")
SYSTEM_CA_BUNDLE: Final = "/etc/ssl/certs/ca-certificates.crt"
MAX_CA_BYTES: Final = 1024 * 1024
WORKSPACE: Final = "/workspace"
MODEL_SOCKET: Final = sandbox.MODEL_SOCKET
EGRESS_SOCKET: Final = sandbox.EGRESS_SOCKET
EGRESS_PORT: Final = 3128
"""Where the agent finds the egress proxy (``HTTP_PROXY``), for a task with ``network``."""
DEFAULT_PORT: Final = sandbox.MODEL_PORT
PLACEHOLDER_KEY: Final = "sandstream-placeholder"
CLI: Final = "claude"
DEFAULT_MAX_RETRIES: Final = 6
"""``CLAUDE_CODE_MAX_RETRIES`` in the sandbox.

The CLI ignores ``retry-after`` and, by default, retries a failing model call 10 times over
~173 s (backoff doubling from 0.5 s). Six is ~31 s: a dead upstream still fails the run
within half a minute, and a model proxy that dies and restarts, even several times in a row,
is ridden out (its socket reappears within a second or two; three restarts in 13 s beat five
retries in the chaos run on 2 busy cores, failing the task with "Connection dropped
(ECONNRESET)").
"""
PROMPT_CHUNK: Final = 16 * 1024
"""Prompt characters per argv string (≤ 64 KiB of UTF-8, well under Linux's 128 KiB cap)."""
MAX_DIFF_BYTES: Final = 384 * 1024

RUN_PACK_MAX_BYTES: Final = 8 * 1024 * 1024
"""The packs (:func:`split_packs`) the run makes itself as it ends, at most (they wait in the
sandbox's /tmp, which counts against its memory); larger ones are packed by exec."""
EMPTY_TREE: Final = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
"""git's empty tree: the record of a workspace empty before the run (no git run for it)."""

# Exit statuses and markers of the in-sandbox script (on the exec's stderr).
MARK_STARTED: Final = "sandstream: started"
MARK_ATTACHED: Final = "sandstream: attached"


def command(spec: TaskSpec, *, resume: str | None = None) -> list[str]:
    """The CLI's argv for a task (the prompt goes in through stdin, see module docs); the
    task's configuration as the CLI's own flags, pointing at the files of :func:`config_files`."""
    argv = [
        CLI,
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "acceptEdits",
    ]
    if resume:
        argv += ["--resume", resume]  # a follow-up: the earlier task's session goes on
    if spec.max_turns is not None:
        argv += ["--max-turns", str(spec.max_turns)]
    if spec.model:
        argv += ["--model", spec.model]
    if run_settings(spec) is not None:
        argv += ["--settings", f"{CONFIG_DIR}/{SETTINGS_FILE}"]
    config = spec.agent
    if config is not None:
        if config.append_system_prompt:
            argv += ["--append-system-prompt-file", f"{CONFIG_DIR}/{APPEND_FILE}"]
        if config.mcp_servers:
            argv += ["--mcp-config", f"{CONFIG_DIR}/{MCP_FILE}", "--strict-mcp-config"]
        if config.json_schema is not None:
            argv += ["--json-schema", msgspec.json.encode(config.json_schema).decode()]
    # Variadic options: they come last, so nothing after them is taken for a tool.
    if spec.allowed_tools:
        argv += ["--allowedTools", *spec.allowed_tools]
    if config is not None and config.disallowed_tools:
        argv += ["--disallowedTools", *config.disallowed_tools]
    return argv


def run_settings(spec: TaskSpec) -> dict[str, Any] | None:
    """The run's settings file (``--settings``): the task's ``settings``; for a task with
    ``network``, under them, ``skipWebFetchPreflight``. Without it the CLI's WebFetch first
    asks api.anthropic.com about the domain, straight, not through the model proxy: the
    task's ``network.allow`` is the policy here, and it would refuse that request."""
    settings = spec.agent.settings if spec.agent is not None else None
    if spec.network is None:
        return settings
    return {"skipWebFetchPreflight": True, **(settings or {})}


def config_files(spec: TaskSpec, *, ca: bytes | None = None) -> dict[str, bytes]:
    """The files the task's configuration needs before the run, by path under ``/tmp`` (the
    executor copies them in as the agent's, with the workspace). ``CLAUDE.md`` is the user's
    memory file, outside ``/workspace``: it is no part of the diff or the branch. ``ca``: the
    installation's extra certificates, for a task with ``network``."""
    files: dict[str, bytes] = {}
    config_dir = CONFIG_DIR.removeprefix("/tmp/")
    if (settings := run_settings(spec)) is not None:
        files[f"{config_dir}/{SETTINGS_FILE}"] = msgspec.json.encode(settings)
    if ca is not None and spec.network is not None:
        files[f"{config_dir}/{CA_FILE}"] = ca
    config = spec.agent
    if config is None:
        return files
    if config.append_system_prompt:
        files[f"{config_dir}/{APPEND_FILE}"] = config.append_system_prompt.encode()
    if config.mcp_servers:
        servers = {
            name: {"type": "stdio", **msgspec.to_builtins(server)}
            for name, server in config.mcp_servers.items()
        }
        files[f"{config_dir}/{MCP_FILE}"] = msgspec.json.encode({"mcpServers": servers})
    if config.claude_md:
        files[f"{HOME_DIR.removeprefix('/tmp/')}/.claude/CLAUDE.md"] = config.claude_md.encode()
    return files


def environment(
    *,
    port: int = DEFAULT_PORT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    egress_port: int | None = None,
    extra_ca: bool = False,
) -> dict[str, str]:
    """The agent's environment inside the sandbox: a placeholder key, never the real one;
    with ``egress_port``, the egress proxy for everything but the model (``NO_PROXY``), and
    with ``extra_ca`` too, the installation's certificates (:data:`CA_FILE`) trusted."""
    env = {
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": str(max_retries),
        "HOME": HOME_DIR,
        "LANG": "C.UTF-8",
    }
    if egress_port is not None:
        proxy = f"http://127.0.0.1:{egress_port}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY"):
            env[name] = env[name.lower()] = proxy
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        if extra_ca:
            env["NODE_EXTRA_CA_CERTS"] = f"{CONFIG_DIR}/{CA_FILE}"
            env.update(dict.fromkeys(CA_BUNDLE_VARS, f"{CONFIG_DIR}/{CA_BUNDLE}"))
    return env


def prompt_chunks(prompt: str, size: int = PROMPT_CHUNK) -> list[str]:
    """The prompt split into argv-sized strings (at least one, possibly empty).

    NUL characters are dropped: no argv string can carry one.
    """
    prompt = prompt.replace("\x00", "")
    return [prompt[i : i + size] for i in range(0, len(prompt), size)] or [""]


_SCRIPT: Final = r"""
set -u
R=__RUN_DIR__
K=__KEEPER_DIR__
W=__WORKSPACE__
S=__SOCKET__
E=__EGRESS__
C=__CONFIG_DIR__
G=__GO_FILE__
# The keeper's record of the workspace (GIT_DIR=$K/git), made when first needed (a workspace
# empty before the run needs none): the files as they are, no in-tree .gitattributes may
# rewrite what is stored.
new_repo() {  # under the lock on $K/lock
    [ -f "$GIT_DIR/info/attributes" ] && return 0
    git init -q &&
        echo '* -text -ident -filter -working-tree-encoding' >"$GIT_DIR/info/attributes.$$" &&
        mv -f "$GIT_DIR/info/attributes.$$" "$GIT_DIR/info/attributes"
}
repo() {  # two followers (a re-attach) may both need it at once: one makes it
    [ -f "$GIT_DIR/info/attributes" ] && return 0
    (flock 9 && new_repo) 9>"$K/lock"
}
# What a follow-up task of the same tenant starts from, as the agent (its own files, 0600 ones
# included) once nothing else of it runs, in one stream: a line "<status> <size>" and that
# many bytes, the CLI's session files as a tar.gz (status 5, no bytes: it wrote none; spooled
# in /tmp to know the size), then the final workspace as a tar.gz, to the end (the status is
# its tar's). Links stay links, nothing is followed.
packs() {
    local spool status
    spool=$(mktemp /tmp/.sandstream-session.XXXXXX) || return 6
    if [ -d /tmp/__SESSION__/.claude ]; then
        tar -czSf "$spool" -C /tmp --ignore-failed-read --warning=no-file-changed \
            __SESSION__/.claude
        status=$?
        [ "$status" = 0 ] || : >"$spool"
    else
        status=5
    fi
    printf '%s %s\n' "$status" "$(stat -c %s "$spool")"
    cat "$spool"
    rm -f "$spool"
    cd "$W" 2>/dev/null || { echo "sandstream: the workspace is unreadable" >&2; return 5; }
    tar -czSf - --ignore-failed-read --warning=no-file-changed .
}
mode=$1; shift
case "$mode" in
run)
    # The agent, in its own session (a kill reaches all it started). This shell outlives it
    # to record its status: a TERM to the session only interrupts the wait (a trap, not an
    # ignore, so the agent itself still gets the default action).
    trap 'true' TERM INT HUP
    cd "$W" || exit 1
    "$@" <"$R/prompt" >"$R/out.jsonl" 2>"$R/err.log" &
    cpid=$!
    echo "$cpid" >"$R/cpid"
    while :; do
        wait "$cpid"
        rc=$?
        kill -0 "$cpid" 2>/dev/null || break
    done
    # The run is over: whatever the agent left running goes now (every process of this user
    # but this shell), so the keeper can collect at once. The executor stops them too.
    kill -KILL -1 2>/dev/null
    # Packed here, now that nothing else of the agent runs, when small: the keeper hands it out
    # after the run's block (one exec fewer). Else, or cut off, the executor packs by exec.
    # (A workspace of more than 64 MiB is not tried: it would rarely fit, and the run's end
    # waits for this.)
    rm -f "$R/keep" "$R/keep.tmp"
    read -r mib _ < <(du -s --apparent-size --block-size=1M "$W" 2>/dev/null)
    if [ "${mib:-65}" -le 64 ] &&
        (packs | head -c $((__KEEP_MAX__ + 1)) >"$R/keep.tmp" && exit "${PIPESTATUS[0]}") \
        2>/dev/null && [ "$(stat -c %s "$R/keep.tmp")" -le __KEEP_MAX__ ]; then
        mv "$R/keep.tmp" "$R/keep"
    else
        rm -f "$R/keep.tmp"
    fi
    echo "$rc" >"$R/exit.tmp" && mv "$R/exit.tmp" "$R/exit"
    exit 0
    ;;
kill)
    pid=$(cat "$R/pid" 2>/dev/null) || exit 0
    [ -f "$R/exit" ] && exit 0
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq 50); do [ -f "$R/exit" ] && break; sleep 0.1; done
    [ -f "$R/exit" ] || kill -KILL "$(cat "$R/cpid" 2>/dev/null)" 2>/dev/null
    for _ in $(seq 20); do [ -f "$R/exit" ] && break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null  # whatever the agent left behind
    exit 0
    ;;
start)
    # As the agent, while the keeper records the workspace (follow): what the run needs is
    # made ready meanwhile, and the agent starts once the keeper says the record is done.
    # mkdir is the lock: one run per sandbox, however often this is repeated.
    port=$1; eport=$2; ncmd=$3; shift 3
    cmd=("${@:1:$ncmd}"); shift "$ncmd"
    if [ -d "$R" ]; then
        echo "__ATTACHED__"
        exit 0
    fi
    home=${HOME:-/tmp/.sandstream-home}
    [ -d "$home" ] || mkdir -p "$home"
    bridge() {  # 127.0.0.1:$1 to the Unix socket $2, fully detached; wait until it listens
        printf -v hex ':%04X 00000000:0000 0A' "$1"
        # A warm sandbox has it from its launcher (shared/launch.py); a start repeated, too.
        grep -q "$hex" /proc/net/tcp && return
        socat "TCP-LISTEN:$1,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$2" \
            </dev/null >>"$home/socat.log" 2>&1 &
        for ((i = 0; i < 200; i++)); do grep -q "$hex" /proc/net/tcp && break; sleep 0.005; done
    }
    bridge "$port" "$S"
    # The egress proxy, for a task with network.allow (0: none, no way out at all).
    [ "$eport" != 0 ] && bridge "$eport" "$E"
    if [ -f "$C/__CA_FILE__" ]; then  # trusted besides the image's, by every TLS client
        cat __SYSTEM_CA__ "$C/__CA_FILE__" >"$C/__CA_BUNDLE__.$$" &&
            mv -f "$C/__CA_BUNDLE__.$$" "$C/__CA_BUNDLE__"  # whole: two starts may race here
    fi
    # The keeper's word, a file of its own in the sticky /tmp: nothing of the agent has run
    # yet (its run folder is not there), so nothing else can have made it. A large workspace
    # takes a while to record: 2 s of short waits, then up to half an hour of longer ones.
    for ((i = 0; i < 18400; i++)); do
        [ "$(stat -c %u "$G" 2>/dev/null)" = __KEEPER_UID__ ] && break
        if ((i < 400)); then sleep 0.005; else sleep 0.1; fi
    done
    if [ "$(stat -c %u "$G" 2>/dev/null)" != __KEEPER_UID__ ]; then
        echo "sandstream: the keeper did not record the workspace" >&2
        exit 2
    fi
    if mkdir "$R" 2>/dev/null; then
        printf '%s' "$@" >"$R/prompt"
        : >"$R/out.jsonl"
        setsid bash -c "$BASH_EXECUTION_STRING" sandstream run "${cmd[@]}" \
            </dev/null >/dev/null 2>&1 &
        echo $! >"$R/pid.tmp" && mv "$R/pid.tmp" "$R/pid"
        echo "__STARTED__"
    else
        echo "__ATTACHED__"
    fi
    exit 0
    ;;
patch)
    # As the keeper, after the run (every process of the agent stopped, the block printed):
    # the agent's changes in full, a binary diff against the record from before the run. The
    # branch is made from it outside the sandbox.
    export GIT_DIR="$K/git" GIT_WORK_TREE="$W" GIT_INDEX_FILE="$K/patch.index"
    if ! read -r base <"$K/base" 2>/dev/null; then
        echo "sandstream: no record of the workspace" >&2
        exit 4
    fi
    cd "$W" 2>/dev/null || { echo "sandstream: the workspace is unreadable" >&2; exit 5; }
    { repo && git read-tree "$base"; } || exit 6
    git -c core.quotePath=false add -A -f --ignore-errors >/dev/null 2>"$K/patch.log"
    if [ $? -ge 128 ]; then  # not recorded (the keeper's tmpfs full): never a partial branch
        echo "sandstream: the changes could not be recorded: $(tail -n 1 "$K/patch.log")" >&2
        exit 7
    fi
    git -c core.quotePath=false diff --cached --binary --no-renames --full-index "$base"
    rc=$?
    rm -f "$GIT_INDEX_FILE"
    exit $rc
    ;;
artifacts)
    # As the keeper, after the run: the workspace's regular files whose path (relative, as
    # find prints it, never through a link) matches one of the patterns, as a tar.gz.
    cd "$W" 2>/dev/null || { echo "sandstream: the workspace is unreadable" >&2; exit 5; }
    find . -mindepth 1 -type f -printf '%P\0' 2>/dev/null | while IFS= read -r -d '' path; do
        for pattern in "$@"; do
            # shellcheck disable=SC2053 # a pattern, on purpose
            if [[ $path == $pattern ]]; then printf '%s\0' "$path"; break; fi
        done
    done | head -z -n 100000 | tar -czf - --null --no-recursion -T - 2>"$K/artifacts.log"
    exit "${PIPESTATUS[3]}"
    ;;
pack)
    # As the agent, after the run, when none of its processes is left (and the run did not
    # pack them itself, see run): the packs on stdout.
    packs
    exit $?
    ;;
follow)
    # As the keeper: the agent can neither trace nor signal this shell, nor write $K. The
    # nonce comes in the environment (argv is readable by every user; environ is not). After
    # from_line, for a warm sandbox, the run's start command for its launcher (shared/launch.py).
    from=$1; shift
    nonce=${SANDSTREAM_NONCE:?}
    unset SANDSTREAM_NONCE
    if [ ! -d "$K" ] || [ ! -O "$K" ]; then
        echo "sandstream: $K is missing or not the keeper's" >&2
        exit 3
    fi
    # Open one of the agent's files, keeping it only if it is a regular file of the agent's
    # own: a link to a file of the keeper's (its /proc entries) must not be read out, and a
    # FIFO (which would block the open) is never opened.
    agent_file() {  # fd name
        [ -f "$R/$2" ] && [ ! -L "$R/$2" ] || return 1
        eval "exec $1<\"\$R/\$2\"" 2>/dev/null || return 1
        if [[ $(stat -L -c '%u %F' "/proc/$$/fd/$1" 2>/dev/null) != "__UID__ regular"* ]]; then
            eval "exec $1<&-"
            return 1
        fi
    }
    export GIT_DIR="$K/git" GIT_WORK_TREE="$W"
    gitq=(git -c core.quotePath=false)
    # A launcher waiting (a warm sandbox; nothing of the agent has run, so the bell is the
    # launcher's): the start command, as a file of the keeper's, and the bell, now. The start
    # makes the run ready meanwhile and waits for the keeper's word below, as by exec.
    launched=""
    if [ $# -gt 1 ] && [ ! -e "$R" ] && [ -p __BELL__ ] && [ ! -L __BELL__ ] &&
        [ "$(stat -c %u __BELL__)" = __UID__ ]; then
        printf '%s\0' "$@" >"__REQUEST__.$$" && mv -f "__REQUEST__.$$" __REQUEST__ &&
            { exec 6<>__BELL__ && printf x >&6 && exec 6>&-; } 2>/dev/null && launched=.launched
    fi
    # The workspace before the agent (it has not started: its run folder is not there), once:
    # a second follower (a re-attach) waits on the lock rather than recording it half-way.
    (
        flock 9
        if [ ! -f "$K/base" ] && [ ! -e "$R" ]; then
            export GIT_INDEX_FILE="$K/base.index"
            shopt -s nullglob dotglob
            entries=("$W"/*)
            shopt -u nullglob dotglob
            if [ "${#entries[@]}" = 0 ] && [ -r "$W" ] && [ -x "$W" ]; then
                # Nothing to record (no repo, no files): the empty tree, and no git run.
                echo __EMPTY_TREE__ >"$K/base.tmp" && mv "$K/base.tmp" "$K/base"
            else
                cd "$W" && new_repo && "${gitq[@]}" add -A -f --ignore-errors
                git write-tree >"$K/base.tmp" && mv "$K/base.tmp" "$K/base"
            fi
            # A checked-out repository (the task's repo): its .git is the agent's, not news.
            if [ -d "$W/.git" ]; then : >"$K/checkout"; fi
        fi
    ) 9>"$K/lock" >"$K/git.log" 2>&1
    # The launcher takes its bell away as it starts the run. One that has not within a second
    # is gone (it died): the executor starts the run by exec (of two starts, one runs).
    if [ -n "$launched" ]; then
        until=$((${EPOCHREALTIME//[!0-9]/} + 1000000))  # in microseconds
        while [ -e __BELL__ ] && ((${EPOCHREALTIME//[!0-9]/} < until)); do sleep 0.005; done
        [ -e __BELL__ ] && launched=""
    fi
    : >>"$G"  # the agent may start now (start waits for this file of the keeper's)
    echo "$nonce.ready$launched"
    # The executor starts the run when it reads the line above.
    for ((i = 0; i < 1200; i++)); do [ -f "$R/pid" ] && break; sleep 0.05; done
    # Builtins (read, mapfile) where possible: every process here delays the result.
    pid="" rc="" base="" oom=0
    agent_file 3 pid && read -r pid <&3 && exec 3<&-
    [[ $pid =~ ^[0-9]+$ ]] || pid=""
    if [ -n "$pid" ] && agent_file 4 out.jsonl; then
        # The file opened above, by descriptor: swapping the name for a link changes nothing.
        # -s: how soon the end of the run is noticed (tail checks the pid that often).
        tail -n "+$((from + 1))" -s 0.005 --pid="$pid" -f "/proc/$$/fd/4" 2>/dev/null
        exec 4<&-
    fi
    # Nothing of the agent may change the workspace or its files while they are collected.
    # The run wrapper stopped its user's processes as the CLI ended: with none left, none can
    # come back (only an exec starts one), and the executor packs at once (.quiet). Else it
    # stops them (kill -KILL -1 as uid 1000) first (.ended), and this waits until they are gone.
    alive=$(find /proc -maxdepth 1 -regex '/proc/[0-9]+' -user __UID__ -print -quit)
    kept=""
    if [ -z "$alive" ] && agent_file 5 keep; then
        kept=1
        echo "$nonce.quiet.packed"  # the run packed what a follow-up needs: after the block
    elif [ -z "$alive" ]; then
        echo "$nonce.quiet"
    else
        echo "$nonce.ended"
    fi
    for ((i = 0; i < 500; i++)); do
        [ -z "$alive" ] && break
        sleep 0.02
        alive=$(find /proc -maxdepth 1 -regex '/proc/[0-9]+' -user __UID__ -print -quit)
    done
    echo "$nonce"
    agent_file 3 exit && read -r rc <&3 && exec 3<&-
    [[ $rc =~ ^[0-9]+$ ]] || rc=""
    echo "exit=$rc"
    echo "pid=$pid"
    while read -r key value; do
        [ "$key" = oom_kill ] && oom=$value
    done </sys/fs/cgroup/memory/memory.oom_control 2>/dev/null
    echo "oom=$oom"
    # How often the sandbox hit its pids limit (a fork bomb): a builtin read, no fork needed.
    read -r key value </sys/fs/cgroup/pids/pids.events 2>/dev/null
    [ "$key" = max ] && echo "pids_max=$value"
    if [ "$rc" = 0 ] || ! agent_file 3 err.log; then
        echo "stderr="
    else
        echo "stderr=$(tail -c 2000 <&3 | tr '\n\r' '  ')"
        exec 3<&-
    fi
    read -r base <"$K/base" 2>/dev/null
    if [ -n "$alive" ]; then
        echo "collect_error=the agent's processes did not stop; its changes were not collected"
        echo "files=0"
    elif [ -z "$base" ]; then
        echo "collect_error=the workspace was not recorded before the run ($(tail -n 1 \
            "$K/git.log" 2>/dev/null | tr '\n\r' '  ' | head -c 300))"
        echo "files=0"
    elif ! cd "$W" 2>/dev/null || [ ! -r . ]; then
        echo "collect_error=the agent made the workspace itself unreadable"
        echo "files=0"
    else
        entries=(x)
        if [ "$base" = __EMPTY_TREE__ ]; then
            shopt -s nullglob dotglob
            entries=(*)
            shopt -u nullglob dotglob
        fi
        if [ "${#entries[@]}" = 0 ]; then
            echo "unreadable=0"  # empty before the run and after it: no git run either
            echo "files=0"
        else
            # An index of its own: a second follower (a re-attach) may be collecting too.
            export GIT_INDEX_FILE="$K/index.$$"
            # What cannot be recorded is named rather than left out: what the agent made
            # unreadable, and git folders (git never records a .git, nor what a nested one
            # holds).
            top=()
            [ -f "$K/checkout" ] && top=(-path ./.git -prune -o)
            mapfile -d '' -t hidden < <(
                find . -mindepth 1 "${top[@]}" \( -iname .git -prune -printf '%P\0' \) -o \
                    \( -type d \( ! -readable -o ! -executable \) -prune -printf '%P\0' \) -o \
                    \( ! -type d ! -type l ! -readable -printf '%P\0' \) \
                    2>/dev/null | head -z -n 100
            )
            # --ignore-errors: an unreadable file is skipped (and named above), not fatal. A
            # failure to write (the keeper's tmpfs full) is said, never shown as "no changes".
            if { repo && git read-tree "$base"; } 2>"$K/add.log"; then
                "${gitq[@]}" add -A -f --ignore-errors >/dev/null 2>"$K/add.log"
                added=$?
            else
                added=128
            fi
            if [ "$added" -ge 128 ]; then
                echo "collect_error=$(tail -n 1 "$K/add.log" | tr '\n\r' '  ' | head -c 500)"
            fi
            # Paths git refused (an invalid name such as .GIT/x): named like the unreadable ones.
            while IFS= read -r line && [ "${#hidden[@]}" -lt 100 ]; do
                case "$line" in
                *"invalid path '"*) line=${line#*invalid path \'} ;;
                *) continue ;;
                esac
                hidden+=("${line%\'*}")
            done <"$K/add.log"
            mapfile -t names < <("${gitq[@]}" diff --cached --name-only "$base" 2>/dev/null)
            echo "unreadable=${#hidden[@]}"
            echo "files=${#names[@]}"
            [ "${#names[@]}" -gt 0 ] && printf '%s\n' "${names[@]}"
            for name in "${hidden[@]}"; do printf '%s\n' "${name//$'\n'/?}"; done
            if [ "${#names[@]}" -gt 0 ]; then
                "${gitq[@]}" diff --cached --binary "$base" 2>/dev/null | head -c __MAX_DIFF__
            fi
            rm -f "$GIT_INDEX_FILE"
        fi
    fi
    echo "$nonce.done"
    # The run's packs (the agent's own file, opened above: never through a link), base64.
    size=$(stat -L -c %s "/proc/$$/fd/5" 2>/dev/null)
    if [ -n "$kept" ] && [ "${size:-0}" -le __KEEP_MAX__ ]; then
        echo "$nonce.pack $size"
        base64 -w 65536 <&5
        echo "$nonce.packed"
    fi
    exit 0
    ;;
esac
echo "sandstream: unknown mode $mode" >&2
exit 2
"""


def wrapper_script(
    *,
    run_dir: str = RUN_DIR,
    keeper_dir: str = KEEPER_DIR,
    workspace: str = WORKSPACE,
    socket: str = MODEL_SOCKET,
    max_diff_bytes: int = MAX_DIFF_BYTES,
) -> str:
    """The bash script run inside the sandbox (``bash -c SCRIPT sandstream <mode> ...``)."""
    return (
        _SCRIPT.replace("__RUN_DIR__", shlex.quote(run_dir))
        .replace("__KEEPER_DIR__", shlex.quote(keeper_dir))
        .replace("__WORKSPACE__", shlex.quote(workspace))
        .replace("__SOCKET__", shlex.quote(socket))
        .replace("__EGRESS__", shlex.quote(EGRESS_SOCKET))
        .replace("__CONFIG_DIR__", shlex.quote(CONFIG_DIR))
        .replace("__GO_FILE__", shlex.quote(GO_FILE))
        .replace("__KEEPER_UID__", str(sandbox.KEEPER_UID))
        .replace("__CA_FILE__", CA_FILE)
        .replace("__CA_BUNDLE__", CA_BUNDLE)
        .replace("__SYSTEM_CA__", SYSTEM_CA_BUNDLE)
        .replace("__UID__", str(SANDBOX_UID))
        .replace("__MAX_DIFF__", str(max_diff_bytes + 1))
        .replace("__BELL__", launch.BELL)
        .replace("__REQUEST__", launch.REQUEST)
        .replace("__EMPTY_TREE__", EMPTY_TREE)
        .replace("__SESSION__", shlex.quote(HOME_DIR.removeprefix("/tmp/")))
        .replace("__KEEP_MAX__", str(RUN_PACK_MAX_BYTES))
        .replace("__STARTED__", MARK_STARTED)
        .replace("__ATTACHED__", MARK_ATTACHED)
    )


def follow_argv(script: str, *, from_line: int, start: Sequence[str] = ()) -> list[str]:
    """As the keeper: record the workspace if nobody has, say ``<nonce>.ready``, then stream
    ``out.jsonl`` from ``from_line`` (0-based) and close with the run's block. ``start``
    (:func:`shared.launch.request`): the run's start for a launcher waiting in the sandbox,
    if one is (it then says ``<nonce>.ready.launched``).

    The nonce goes in the environment (:func:`keeper_environment`), never in argv.
    """
    return ["bash", "-c", script, "sandstream", "follow", str(from_line), *start]


def keeper_environment(nonce: str) -> dict[str, str]:
    return {NONCE_VAR: nonce, "HOME": KEEPER_DIR, "LANG": "C.UTF-8"}


def start_argv(
    script: str,
    spec: TaskSpec,
    *,
    port: int = DEFAULT_PORT,
    egress_port: int | None = None,
    resume: str | None = None,
) -> list[str]:
    """As the agent: start the run unless it was started (prints which, see MARK_*)."""
    cmd = command(spec, resume=resume)
    return [
        "bash",
        "-c",
        script,
        "sandstream",
        "start",
        str(port),
        str(egress_port or 0),
        str(len(cmd)),
        *cmd,
        *prompt_chunks(spec.prompt),
    ]


def patch_argv(script: str) -> list[str]:
    """As the keeper, once the run is over: its changes as one binary diff on stdout."""
    return ["bash", "-c", script, "sandstream", "patch"]


def artifacts_argv(script: str, patterns: Sequence[str]) -> list[str]:
    """As the keeper, once the run is over: the files matching ``patterns`` as a tar.gz."""
    return ["bash", "-c", script, "sandstream", "artifacts", *patterns]


def pack_argv(script: str) -> list[str]:
    """As the agent, once the run is over: the CLI's session files (under :data:`HOME_DIR`)
    and the workspace, each a tar.gz, in one stream (see :func:`split_packs`): what a
    follow-up starts from."""
    return ["bash", "-c", script, "sandstream", "pack"]


class Packs(msgspec.Struct, frozen=True, kw_only=True):
    """What the pack command printed, taken apart."""

    session: bytes | None
    """The session's tar.gz; ``None`` when there is none (``session_status`` says why)."""
    session_status: int
    """0: packed; 5: the CLI wrote no session; else tar's failure."""
    workspace: bytes


RUN_PACK_MAX_CHARS: Final = (RUN_PACK_MAX_BYTES // 3 + 1) * 4
"""The run's packs in base64, at most."""


def decode_packs(lines: Sequence[str], size: int) -> bytes | None:
    """The run's packs from the keeper's base64 lines; ``None`` when they do not decode to
    ``size`` bytes (the stream was cut)."""
    try:
        data = base64.b64decode("".join(lines), validate=True)
    except binascii.Error:
        return None
    return data if len(data) == size else None


def split_packs(data: bytes) -> Packs:
    """The pack command's stream: a line ``<status> <size>``, ``size`` bytes of the session,
    then the workspace. ``ValueError`` for anything else (a cut stream)."""
    head, sep, rest = data.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise ValueError(f"no pack header: {head[:40]!r}")
    status, size = int(fields[0]), int(fields[1])
    if size > len(rest):
        raise ValueError(f"the session pack is cut ({len(rest)} of {size} bytes)")
    session = rest[:size] if status == 0 else None
    return Packs(session=session, session_status=status, workspace=rest[size:])


def kill_argv(script: str) -> list[str]:
    """Stop the run (TERM to its session, KILL after 5 s); a no-op when there is none."""
    return ["bash", "-c", script, "sandstream", "kill"]


# ---- what comes back ---------------------------------------------------------------------


class Collected(msgspec.Struct, frozen=True, kw_only=True):
    """The block the keeper prints after the run has ended.

    ``exit_code``, ``started`` and ``stderr_tail`` are the run's own report (files of the
    agent's user: the agent can write them, as it can trace the CLI). The rest is the keeper's:
    the counters of the sandbox's cgroup and the changes against the keeper's record of the
    workspace before the run.
    """

    exit_code: int | None
    """``None`` when the run has no exit file (it never started, or was cut short)."""
    started: bool
    """The run had a pid: it was started at some point."""
    oom_kills: int = 0
    pids_limit_hits: int = 0
    """How often a fork in the sandbox was refused by its pids limit."""
    stderr_tail: str = ""
    files_changed: list[str] = msgspec.field(default_factory=list)
    diff: str = ""
    diff_truncated: bool = False
    unreadable: list[str] = msgspec.field(default_factory=list)
    """Workspace paths the keeper could not record (the agent took the read permission away,
    a ``.git`` folder, a name git refuses): their changes are not in ``diff``; they are listed
    in ``files_changed`` and named in a note."""
    collect_error: str = ""
    """Why the changes could not be recorded at all (``diff`` then says so)."""


def parse_collected(lines: Sequence[str], *, max_diff_bytes: int = MAX_DIFF_BYTES) -> Collected:
    """Parse the lines after the nonce (see :func:`wrapper_script`); tolerant of cut output."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(lines) and "=" in lines[i]:
        key, _, value = lines[i].partition("=")
        fields[key] = value
        i += 1
        if key == "files":
            break
    count = max(_int_or_none(fields.get("files")) or 0, 0)
    hidden_count = max(_int_or_none(fields.get("unreadable")) or 0, 0)
    names = [unquote_git_path(n) for n in lines[i : i + count] if n]
    i += count
    hidden = [n for n in lines[i : i + hidden_count] if n]
    diff_lines = lines[i + hidden_count :]
    diff = "\n".join(diff_lines)
    if diff and not diff.endswith("\n"):
        diff += "\n"
    raw = diff.encode()
    truncated = len(raw) > max_diff_bytes
    if truncated:
        diff = raw[:max_diff_bytes].decode(errors="ignore")
        diff += f"\n[sandstream: diff truncated at {max_diff_bytes} bytes]\n"
    collect_error = fields.get("collect_error", "").strip()
    if collect_error:
        diff += f"[sandstream: the workspace's changes could not be recorded: {collect_error}]\n"
    if hidden:
        more = f" and {len(hidden) - 10} more" if len(hidden) > 10 else ""
        shown = ", ".join(hidden[:10]) + more
        diff += (
            f"[sandstream: {len(hidden)} workspace paths could not be recorded (made "
            f"unreadable, a .git folder, or a name git refuses); their changes are not in "
            f"this diff: {shown}]\n"
        )
    listed = set(names)
    return Collected(
        exit_code=_int_or_none(fields.get("exit")),
        started=bool(fields.get("pid", "").strip()),
        oom_kills=_int_or_none(fields.get("oom")) or 0,
        pids_limit_hits=_int_or_none(fields.get("pids_max")) or 0,
        stderr_tail=fields.get("stderr", "").strip(),
        files_changed=bounded_names(names + [n for n in hidden if n not in listed]),
        diff=diff,
        diff_truncated=truncated,
        unreadable=hidden,
        collect_error=collect_error,
    )


MAX_FILES_LISTED: Final = 1000
MAX_FILES_BYTES: Final = 64 * 1024


def bounded_names(names: list[str]) -> list[str]:
    """At most :data:`MAX_FILES_LISTED` names, :data:`MAX_FILES_BYTES` in all; a last entry
    says how many more there were."""
    kept: list[str] = []
    size = 0
    for name in names:
        size += len(name.encode()) + 4
        if len(kept) >= MAX_FILES_LISTED or size > MAX_FILES_BYTES:
            kept.append(f"[sandstream: {len(names) - len(kept)} more files not listed]")
            break
        kept.append(name)
    return kept


def _int_or_none(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return None


_GIT_ESCAPES: Final = {
    "a": 7,
    "b": 8,
    "t": 9,
    "n": 10,
    "v": 11,
    "f": 12,
    "r": 13,
    '"': 34,
    "\\": 92,
}


def unquote_git_path(name: str) -> str:
    """Undo git's C-style quoting of unusual path names (``"a\\tb"`` → ``a<TAB>b``)."""
    if len(name) < 2 or not (name.startswith('"') and name.endswith('"')):
        return name
    body, out, i = name[1:-1], bytearray(), 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _GIT_ESCAPES:
                out.append(_GIT_ESCAPES[nxt])
                i += 2
                continue
            octal = body[i + 1 : i + 4]
            if len(octal) == 3 and all(c in "01234567" for c in octal):
                out.append(int(octal, 8))
                i += 4
                continue
        out += ch.encode()
        i += 1
    return out.decode(errors="replace")


class AgentResult(msgspec.Struct, frozen=True, kw_only=True):
    """The CLI's final ``result`` object (docs/api.md, "Result"), or what is known without it."""

    found: bool
    """A ``result`` line was seen."""
    text: str = ""
    is_error: bool = True
    subtype: str = ""
    num_turns: int = 0
    total_cost_usd: float = 0.0
    usage: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str = ""
    permission_denials: list[dict[str, Any]] = msgspec.field(default_factory=list)
    duration_ms: int = 0
    structured_output: Any = None
    """With ``--json-schema``: the object the CLI validated against it."""


_json = msgspec.json.Decoder()


def _as_int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


class Transcript:
    """Follows stream-json lines and keeps what the result needs; never raises on bad lines."""

    def __init__(self) -> None:
        self._result: dict[str, Any] | None = None
        self.session_id = ""
        self.last_text = ""
        self.lines = 0

    def feed(self, line: str) -> None:
        self.lines += 1
        text = line.strip()
        if not text.startswith("{"):
            return
        try:
            obj = _json.decode(text)
        except msgspec.DecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if isinstance(obj.get("session_id"), str) and obj["session_id"]:
            self.session_id = obj["session_id"][:128]  # the agent's to write: bounded
        if kind == "result":
            self._result = obj
        elif kind == "assistant":
            message = obj.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                texts = [
                    b["text"]
                    for b in content
                    if isinstance(b, dict)
                    and b.get("type") == "text"
                    and isinstance(b.get("text"), str)
                ]
                if texts:
                    self.last_text = "\n".join(texts)

    def feed_all(self, lines: Iterable[str]) -> Transcript:
        for line in lines:
            self.feed(line)
        return self

    @property
    def has_result(self) -> bool:
        return self._result is not None

    def result(self) -> AgentResult:
        r = self._result
        if r is None:
            return AgentResult(found=False, text=self.last_text, session_id=self.session_id)
        usage = r.get("usage")
        denials = r.get("permission_denials")
        cost = r.get("total_cost_usd")
        text = r.get("result")
        if not isinstance(text, str):
            errors = r.get("errors")
            text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""
        return AgentResult(
            found=True,
            text=text,
            is_error=bool(r.get("is_error", True)),
            subtype=str(r.get("subtype") or ""),
            num_turns=_as_int(r.get("num_turns")),
            total_cost_usd=float(cost) if isinstance(cost, int | float) else 0.0,
            usage=dict(usage) if isinstance(usage, dict) else {},
            session_id=str(r.get("session_id") or self.session_id)[:128],
            permission_denials=[d for d in denials if isinstance(d, dict)]
            if isinstance(denials, list)
            else [],
            duration_ms=_as_int(r.get("duration_ms")),
            structured_output=r.get("structured_output"),
        )


def parse_result(lines: Iterable[str]) -> AgentResult:
    """The result of a whole stream-json transcript (see :class:`Transcript`)."""
    return Transcript().feed_all(lines).result()


def truncate_line(line: str, max_bytes: int) -> str:
    """``line`` if it fits in ``max_bytes`` of UTF-8, else its head and a marker."""
    raw = line.encode()
    if len(raw) <= max_bytes:
        return line
    head = raw[:max_bytes].decode(errors="ignore")
    return f"{head}…[sandstream: line truncated, {len(raw)} bytes]"


def bounded_denials(denials: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """Permission denials fitting in about ``max_bytes`` (long tool inputs are shortened)."""
    out: list[dict[str, Any]] = []
    used = 0
    for d in denials:
        size = len(msgspec.json.encode(d))
        if size > 4096:
            d = _shorten(d, 1024)
            size = len(msgspec.json.encode(d))
        if used + size > max_bytes:
            break
        out.append(d)
        used += size
    return out


def _shorten(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return truncate_line(value, limit)
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    return value


def env_lines(env: Mapping[str, str]) -> list[str]:
    """``KEY=value`` lines, sorted (for logs and tests; holds no secret by construction)."""
    return [f"{k}={v}" for k, v in sorted(env.items())]
