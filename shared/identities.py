"""Bus identities: one NATS nkey per component, and what each may publish and consume.

Each component may publish only the event types it owns (``<prefix>.*.<EventType>``), use
only its own durable consumers, and read the stream (ordered consumers, direct gets, stream
info). ``reader`` (``sandstream replay``) reads and publishes nothing. Nobody may update,
purge or delete the stream or another component's consumer. ``docs/api.md`` ("Bus
identities") is the user-facing description; ``docs/flow.md`` lists who publishes what.

:func:`provision` writes ``server.conf`` and one ``<name>.nk`` seed (0600) per component into
a folder; ``sandstream up`` uses it for its private nats-server, and the tests for theirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nkeys

from shared import events as ev

COMPONENTS: Final = ("gateway", "lifecycle", "executor", "storage", "reader")

# Who publishes which event (docs/flow.md). Storage ends a task it can never store (give-up).
PUBLISHES: Final[dict[str, tuple[type[ev.Event], ...]]] = {
    "gateway": (ev.TaskRequested, ev.TaskCancelRequested),
    "lifecycle": (
        ev.SandboxStarted,
        ev.SandboxStopped,
        ev.TaskSucceeded,
        ev.TaskFailed,
        ev.TaskCancelled,
        ev.TaskTimedOut,
    ),
    "executor": (
        ev.WorkspacePrepared,
        ev.ExecutionStarted,
        ev.AgentOutput,
        ev.EgressBlocked,
        ev.BranchPushed,
        ev.ExecutionCompleted,
        ev.ExecutionFailed,
    ),
    "storage": (ev.ResultStored, ev.StorageFailed),
    "reader": (),
}
DURABLES: Final[dict[str, tuple[str, ...]]] = {
    "gateway": (),
    "lifecycle": ("lifecycle-admit", "lifecycle"),
    "executor": ("executor",),
    "storage": ("storage",),
    "reader": (),
}


@dataclass(frozen=True)
class Scope:
    """The names permissions are written for: a stream, its subject prefix, and the prefix of
    durable consumer names. ``"*"`` for any of them matches every name (tests only)."""

    stream: str = "TASKS"
    prefix: str = "tasks"
    consumer_prefix: str = ""


def permissions(component: str, scope: Scope) -> dict[str, dict[str, list[str]]]:
    """The nats-server ``permissions`` block of ``component``."""
    s = scope.stream
    api = "$JS.API"
    publish = [
        # reading: stream info, direct and stored gets, ordered (ephemeral) consumers
        f"{api}.INFO",
        f"{api}.STREAM.INFO.{s}",
        f"{api}.STREAM.MSG.GET.{s}",
        f"{api}.DIRECT.GET.{s}",
        f"{api}.DIRECT.GET.{s}.>",
        f"{api}.CONSUMER.CREATE.{s}",
        f"{api}.CONSUMER.INFO.{s}.*",
        f"$JS.FC.{s}.>",
    ]
    if component != "reader":
        publish.append(f"{api}.STREAM.CREATE.{s}")  # the first service to start makes it
    for cls in PUBLISHES[component]:
        publish.append(f"{scope.prefix}.*.{ev.type_name(cls)}")
    for durable in DURABLES[component]:
        name = "*" if scope.consumer_prefix == "*" else scope.consumer_prefix + durable
        publish += [
            f"{api}.CONSUMER.DURABLE.CREATE.{s}.{name}",
            f"{api}.CONSUMER.MSG.NEXT.{s}.{name}",
            f"$JS.ACK.{s}.{name}.>",
        ]
    return {"publish": {"allow": publish}, "subscribe": {"allow": ["_INBOX.>"]}}


def new_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    key = nkeys.from_seed(seed).public_key
    return key.decode() if isinstance(key, bytes) else str(key)


def seed_path(folder: Path, component: str) -> Path:
    return folder / f"{component}.nk"


def provision(
    folder: Path,
    scope: Scope,
    *,
    listen: str,
    store_dir: Path,
    extra: dict[str, dict[str, dict[str, list[str]]]] | None = None,
) -> Path:
    """Write ``server.conf`` and each component's seed into ``folder``; return the config.

    Seeds already there are kept (a restart keeps its identities); missing ones are made.
    The config requires an nkey for every connection and enables JetStream in ``store_dir``.
    ``extra`` adds identities with the given permissions (the tests' own harness).
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    wanted = {name: permissions(name, scope) for name in COMPONENTS} | (extra or {})
    users = []
    for component, allowed in wanted.items():
        path = seed_path(folder, component)
        if path.exists():
            seed = path.read_bytes().strip()
        else:
            seed = new_seed()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(seed + b"\n")
        users.append({"nkey": public_key(seed), "permissions": allowed})
    host, _, port = listen.rpartition(":")
    # JSON is valid nats-server config syntax; json.dumps quotes every subject safely.
    config = "\n".join(
        [
            f"listen: {json.dumps(f'{host}:{port}')}",
            f"jetstream: {{ store_dir: {json.dumps(str(store_dir))} }}",
            f"authorization: {json.dumps({'users': users}, indent=2)}",
            "",
        ]
    )
    conf = folder / "server.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(config)
    return conf
