"""Bus identities against a real nats-server with the production scope (stream ``TASKS``).

Each identity may publish only the events its component owns and use only its own durable
consumers; ``reader`` reads and publishes nothing; an anonymous connection is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from shared import events as ev
from shared.bus import Bus, NatsAuth, StreamSettings, connect
from shared.errors import Unavailable
from shared.identities import COMPONENTS, DURABLES, PUBLISHES, Scope
from tests.support.procs import NatsServer


def sample(cls: type[ev.Event]) -> ev.Event:
    """A valid event of type ``cls`` (fields beyond the envelope get plausible values)."""
    task = ev.new_task_id()
    envelope = {"event_id": ev.event_id(task, ev.type_name(cls)), "task_id": task, "tenant": "t"}
    extras: dict[type[ev.Event], dict[str, object]] = {
        ev.TaskRequested: {"spec": ev.TaskSpec(prompt="p")},
        ev.SandboxStarted: {"sandbox": "s", "image": "i"},
        ev.AgentOutput: {"batch": 0, "lines": []},
        ev.ExecutionCompleted: {"text": "", "is_error": False, "exit_code": 0},
        ev.ExecutionFailed: {"code": "internal", "message": "m"},
        ev.ResultStored: {"status": "succeeded", "location": "l", "objects": []},
        ev.TaskFailed: {"error": ev.ErrorInfo(code="internal", message="m")},
        ev.StorageFailed: {"error": ev.ErrorInfo(code="storage_failed", message="m")},
        ev.TaskTimedOut: {"timeout_s": 1},
        ev.ExecutionStarted: {"sandbox": "s"},
        ev.SandboxStopped: {"sandbox": "s", "reason": "done"},
        ev.BranchPushed: {"url": "u", "branch": "b", "commit": "c"},
        ev.EgressBlocked: {"host": "h", "port": 443, "reason": "r"},
    }
    return cls(**envelope, **extras.get(cls, {}))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    nats = NatsServer(tmp_path_factory.mktemp("identities"), scope=Scope())
    nats.start()
    yield nats
    nats.stop()


@pytest.fixture(scope="module")
async def stream(server: NatsServer) -> AsyncIterator[None]:
    nc = await connect(server.url, name="setup", auth=server.auth("lifecycle"))
    await Bus(nc, StreamSettings()).ensure_stream()  # a component may create the stream
    await nc.close()
    yield


async def as_component(server: NatsServer, name: str) -> Bus:
    return Bus(await connect(server.url, name=name, auth=server.auth(name)), StreamSettings())


async def test_a_connection_without_credentials_is_refused(server: NatsServer) -> None:
    with pytest.raises(Unavailable):
        await connect(server.url, name="anonymous", connect_timeout=1.0)
    stranger = server.data_dir / "stranger.nk"
    from shared.identities import new_seed

    stranger.write_bytes(new_seed())
    with pytest.raises(Unavailable):
        await connect(
            server.url, name="stranger", auth=NatsAuth(nkey=stranger), connect_timeout=1.0
        )


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.usefixtures("stream")
async def test_each_identity_publishes_only_its_own_events(
    server: NatsServer, component: str
) -> None:
    bus = await as_component(server, component)
    try:
        for cls in ev.EVENT_TYPES:
            event = sample(cls)
            if cls in PUBLISHES[component]:
                ack = await bus.publish(event, timeout=2.0)
                assert ack.seq > 0
            else:
                with pytest.raises(Unavailable):
                    await bus.publish(event, timeout=0.3)
        # Everybody reads the stream (reader comes last: the others have published by then).
        assert [r async for r in bus.read()]
    finally:
        await bus.nc.close()


@pytest.mark.usefixtures("stream")
async def test_each_identity_uses_only_its_own_consumers(server: NatsServer) -> None:
    for component in COMPONENTS:
        bus = await as_component(server, component)
        try:
            mine = set(DURABLES[component])
            for other in {d for ds in DURABLES.values() for d in ds}:
                config = ConsumerConfig(
                    durable_name=other,
                    ack_policy=AckPolicy.EXPLICIT,
                    filter_subjects=[f"tasks.*.{ev.type_name(ev.TaskRequested)}"],
                )
                if other in mine:
                    await bus.js.add_consumer("TASKS", config, timeout=2.0)
                    sub = await bus.js.pull_subscribe_bind(durable=other, stream="TASKS")
                    msgs = await sub.fetch(1, timeout=2.0)  # refused, it would time out
                    await msgs[0].ack()
                else:
                    with pytest.raises(Exception):  # noqa: B017 - refused: no reply comes
                        await bus.js.add_consumer("TASKS", config, timeout=0.5)
        finally:
            await bus.nc.close()


async def test_the_stream_cannot_be_purged_or_deleted_by_any_component(
    server: NatsServer, stream: None
) -> None:
    for component in COMPONENTS:
        bus = await as_component(server, component)
        try:
            # Refused by the permissions (no answer comes), and by the stream's own flags.
            with pytest.raises(Exception):  # noqa: B017
                await asyncio.wait_for(bus.js.purge_stream("TASKS"), 0.5)
            with pytest.raises(Exception):  # noqa: B017
                await asyncio.wait_for(bus.js.delete_stream("TASKS"), 0.5)
        finally:
            await bus.nc.close()
    nc = await connect(server.url, name="check", auth=server.auth())
    info = await nc.jetstream().stream_info("TASKS")
    await nc.close()
    assert info.state.messages > 0 and info.config.deny_purge and info.config.deny_delete


def test_the_seeds_are_private(server: NatsServer) -> None:
    for name in COMPONENTS:
        path = server.identities / f"{name}.nk"
        assert oct(path.stat().st_mode & 0o777) == "0o600", name
    assert oct(server.identities.stat().st_mode & 0o777) == "0o700"
    assert Path(server.identities / "server.conf").stat().st_mode & 0o077 == 0
