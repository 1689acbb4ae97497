"""The agent's launcher in a warm-pool sandbox: a claimed sandbox starts its run without an exec.

A pool sandbox is made before its task exists. With it the lifecycle starts, as the agent's
user, a shell that waits (blocked on a FIFO of its own in the sandbox's /tmp, :data:`BELL`: no
polling) for the run's start command. That command comes with the keeper's follow, the exec
the executor starts for every run anyway: the keeper (uid 1001, whose commands come only from
the executor) writes it to :data:`REQUEST`, a file of its own, and rings the bell; the
launcher runs it only from a regular file of the keeper's. The start then waits for the
keeper's record of the workspace, as a start by exec does.
One exec, ~50 ms of the engine's time, fewer on the way to the agent's first output. The
launcher also starts the agent's forwarder to the model (127.0.0.1:``MODEL_PORT`` to the model
socket, which comes with the claim: it is reached per connection) before the claim: the start
finds it listening and starts none (20-30 ms).

It runs once: it becomes the start command, whose lock (``mkdir`` of the run folder) keeps one
run per sandbox. When the keeper finds no launcher (no pool, a re-attach, a launcher not yet
up), or the launcher does not take its bell away within a second of the ring (it died), it
says so, and the executor starts the run by exec, as it always could.

Trust: nothing of any task runs in the sandbox before the claim, so the bell the keeper rings
is the launcher's; the agent can ring it too once it runs, but by then the launcher is gone,
and a request must be the keeper's. Nothing is written on the host side.
"""

from __future__ import annotations

from typing import Final

from shared.sandbox import KEEPER_UID, MODEL_PORT, MODEL_SOCKET, WORKSPACE, SandboxDriver

BELL: Final = "/tmp/.sandstream-bell"
"""The launcher's FIFO (its own, mode 0666: the keeper rings it with one byte)."""
REQUEST: Final = "/tmp/.sandstream-start"
"""The start command, the keeper's file, NUL-separated: the number of environment entries, the
``NAME=value`` entries, then argv."""
LOG: Final = "/tmp/.sandstream-launch.log"
"""What the launcher and the start command said, in the sandbox (for whoever debugs it)."""

SCRIPT: Final = r"""
set -u
exec >>__LOG__ 2>&1 </dev/null
socat TCP-LISTEN:__PORT__,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:__SOCKET__ &
rm -f __BELL__ && mkfifo -m 0666 __BELL__ || exit 1
exec 3<>__BELL__ || exit 1  # read and write: never blocks, and a read waits for a byte
until [ -f __REQUEST__ ] && [ ! -L __REQUEST__ ] &&
    [ "$(stat -c %u __REQUEST__)" = __KEEPER_UID__ ]; do
    read -r -n 1 -u 3 _ || exit 1
done
exec 3<&-
mapfile -d '' -t req <__REQUEST__
n=${req[0]:-x}
if [[ ! $n =~ ^[0-9]+$ ]] || ((${#req[@]} < n + 2)); then
    echo "sandstream: a malformed launch request" >&2
    exit 1
fi
for ((i = 1; i <= n; i++)); do export "${req[i]}"; done
cd __WORKSPACE__ || exit 1
rm -f __BELL__  # taken away last: a keeper that still sees it knows no start comes from here
exec "${req[@]:n+1}"
"""


def argv() -> list[str]:
    """The launcher's command."""
    script = (
        SCRIPT.replace("__LOG__", LOG)
        .replace("__BELL__", BELL)
        .replace("__REQUEST__", REQUEST)
        .replace("__KEEPER_UID__", str(KEEPER_UID))
        .replace("__WORKSPACE__", WORKSPACE)
        .replace("__PORT__", str(MODEL_PORT))
        .replace("__SOCKET__", MODEL_SOCKET)
    )
    return ["bash", "-c", script, "sandstream-launch"]


async def start(driver: SandboxDriver, name: str) -> None:
    """Start the launcher in a started sandbox: detached, as the agent's user, waiting."""
    await driver.exec(name, argv(), detach=True)


def request(env: dict[str, str], argv: list[str]) -> list[str]:
    """The start command as the keeper's follow takes it (its arguments after ``from_line``):
    the entries :data:`REQUEST` holds. ``ValueError`` for a NUL, which no argv can carry."""
    entries = [str(len(env)), *(f"{name}={value}" for name, value in env.items()), *argv]
    if any("\x00" in entry for entry in entries):
        raise ValueError("a launch request cannot carry a NUL character")
    return entries
