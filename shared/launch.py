"""The agent's launcher in a warm-pool sandbox: a claimed sandbox starts its run without an exec.

A pool sandbox is made before its task exists. With it the lifecycle starts, as the agent's
user, a shell that waits (blocked on a FIFO, no polling) in the sandbox's socket folder, which
the sandbox sees read-only. Once a task has claimed the sandbox, the model proxy (the folder's
owner, at the executor's request) writes the run's start command into that folder (the
environment and argv the executor's start exec would carry, nothing else) and wakes the
launcher, which runs it: one exec, ~50 ms of the engine's time, fewer on the way to the
agent's first output.

It runs once: it becomes the start command, whose lock (``mkdir`` of the run folder) keeps one
run per sandbox. Without a launcher waiting (no pool, a re-attach, a launcher not yet up) the
executor starts the run by exec, as it always could; both at once still make one run.

Trust: only the host side writes the folder (the sandbox's mount is read-only); the request
holds the task's own prompt and the agent's environment (a placeholder key, no secret) and the
folder is the sandbox user's alone (mode 0700); it goes with the folder when the task ends.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from shared.sandbox import SOCKET_MOUNT, WORKSPACE, SandboxDriver, share_with_sandbox

FIFO: Final = "launch"
"""The launcher's doorbell, a FIFO in the socket folder (it holds it open to read and write, so
opening it never blocks and a read waits for a byte)."""
REQUEST: Final = "launch.request"
"""The start command, NUL-separated: the number of environment entries, the ``NAME=value``
entries, then argv."""
LOG: Final = "/tmp/.sandstream-launch.log"
"""What the launcher and the start command said, in the sandbox (for whoever debugs it)."""

SCRIPT: Final = r"""
set -u
exec >>__LOG__ 2>&1 </dev/null
dir=$1
exec 3<>"$dir/__FIFO__" || exit 1
until [ -f "$dir/__REQUEST__" ]; do
    read -r -n 1 -u 3 _ || exit 1
done
exec 3<&-
mapfile -d '' -t req <"$dir/__REQUEST__"
n=${req[0]:-x}
if [[ ! $n =~ ^[0-9]+$ ]] || ((${#req[@]} < n + 2)); then
    echo "sandstream: a malformed launch request" >&2
    exit 1
fi
for ((i = 1; i <= n; i++)); do export "${req[i]}"; done
cd __WORKSPACE__ || exit 1
exec "${req[@]:n+1}"
"""


async def start(driver: SandboxDriver, name: str) -> None:
    """Start the launcher in a started sandbox made ready by :func:`prepare`: detached,
    as the agent's user, waiting."""
    await driver.exec(name, argv(), detach=True)


def argv() -> list[str]:
    """The launcher's command."""
    script = (
        SCRIPT.replace("__LOG__", LOG)
        .replace("__FIFO__", FIFO)
        .replace("__REQUEST__", REQUEST)
        .replace("__WORKSPACE__", WORKSPACE)
    )
    return ["bash", "-c", script, "sandstream-launch", SOCKET_MOUNT]


def prepare(folder: Path) -> None:
    """Make the doorbell in a sandbox's socket folder (before its launcher starts)."""
    fifo = folder / FIFO
    with contextlib.suppress(FileExistsError):
        os.mkfifo(fifo, 0o600)
    share_with_sandbox(fifo)


def request(folder: Path, env: Mapping[str, str], argv: Sequence[str]) -> bool:
    """Hand the start command to the sandbox's launcher; ``False`` when none is waiting (the
    caller starts the run itself). The request is in place before the doorbell rings, so a
    launcher that opens its FIFO just after the check below still finds it."""
    entries = [str(len(env)), *(f"{name}={value}" for name, value in env.items()), *argv]
    if any("\x00" in entry for entry in entries):
        raise ValueError("a launch request cannot carry a NUL character")
    fifo = folder / FIFO
    if not fifo.exists():
        return False  # a sandbox made without a launcher
    target = folder / REQUEST
    partial = folder / (REQUEST + ".tmp")
    partial.write_bytes(b"\x00".join(entry.encode() for entry in entries) + b"\x00")
    share_with_sandbox(partial, read_only=True)
    os.replace(partial, target)
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return False  # nobody reads it: no launcher (any more)
        raise
    try:
        os.write(fd, b"\n")
    except BlockingIOError:
        pass  # a full pipe: the launcher has bytes enough to wake on
    finally:
        os.close(fd)
    return True
