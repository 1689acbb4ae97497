"""Events are untrusted input: a forged or misfiled event reaches no handler and no reader.

The reproduction of the review's critical finding runs against the real lifecycle: a
``TaskRequested`` whose task id is the absolute path of a folder, on a subject that carries
that path, with its deadline long past. Before, the lifecycle removed that folder.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from shared import events as ev
from shared.bus import Bus
from shared.worker import Delivery, Worker
from tests.integration.test_lifecycle import Harness, h  # noqa: F401 (the fixture)
from tests.support.sandboxes import types_of, wait_for_event


async def publish_raw(bus: Bus, subject: str, event: ev.AnyEvent) -> None:
    """Publish as a hostile client would: any subject, any body, no checks of ours."""
    await bus.js.publish(subject, ev.encode(event), stream=bus.stream.name)


def forgeries(bus: Bus, victim: str) -> list[tuple[str, ev.AnyEvent]]:
    good, other = ev.new_task_id(), ev.new_task_id()
    spec = ev.TaskSpec(prompt="x", timeout_s=1)

    def requested(task_id: str, event_id: str | None = None) -> ev.TaskRequested:
        return ev.TaskRequested(
            event_id=event_id or ev.event_id(task_id, "TaskRequested"),
            task_id=task_id,
            tenant="mallory",
            spec=spec,
            at=ev.now() - timedelta(days=1),
        )

    return [
        # a path for a task id (a subject token may hold '/')
        (f"{bus.prefix}.{victim}.TaskRequested", requested(victim)),
        # a valid id, filed under another task's subject
        (bus.subject(other, "TaskRequested"), requested(good)),
        # a valid id under its own task, but another event's type on the subject
        (bus.subject(good, "TaskRequested"), ev.TaskCancelRequested(
            event_id=ev.event_id(good, "TaskCancelRequested"), task_id=good, tenant="mallory"
        )),
        # an event id that belongs to another task (it would deduplicate that task's event)
        (bus.subject(good, "TaskRequested"), requested(good, ev.event_id(other, "TaskRequested"))),
        # an id with a trailing newline, which a careless `^...$` match lets through
        (bus.subject(good, "TaskRequested"), requested(good + "\n")),
    ]  # fmt: skip


async def test_a_worker_never_hands_an_untrusted_event_to_its_handler(
    bus: Bus, tmp_path: Path
) -> None:
    victim = str(tmp_path / "victim")
    for subject, event in forgeries(bus, victim):
        await publish_raw(bus, subject, event)
    honest = ev.new_task_id()
    await publish_raw(
        bus,
        bus.subject(honest, "TaskRequested"),
        ev.TaskRequested(
            event_id=ev.event_id(honest, "TaskRequested"),
            task_id=honest,
            tenant="acme",
            spec=ev.TaskSpec(prompt="x"),
        ),
    )
    seen: list[str] = []

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        seen.append(event.task_id)

    worker = Worker(
        bus=bus, durable="untrusted", subjects=[bus.subject("*", "TaskRequested")], handler=handler
    )
    await worker.run_until_idle()
    assert seen == [honest]
    info = await bus.js.consumer_info(bus.stream.name, "untrusted")
    assert info.num_pending == 0 and info.num_ack_pending == 0  # terminated, not retried

    # Readers (projections, SSE, history) skip them too.
    read = [record.event.task_id async for record in bus.read()]
    assert read == [honest]
    assert await bus.last(victim, "TaskRequested") is None


def test_task_ids_are_checked_exactly() -> None:
    assert ev.is_task_id(ev.new_task_id())
    for bad in ("t_x", "/home", "t_aaaaaaaaaaaaaaaaaaaa\n", "t_AAAAAAAAAAAAAAAAAAAA", "*", ">"):
        assert not ev.is_task_id(bad), bad


@pytest.mark.docker
async def test_a_forged_request_naming_a_folder_removes_nothing(
    h: Harness,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    service = h.lifecycle(socket_dir=tmp_path)  # the victim sits right in the socket folder
    await service.start()
    for subject, event in forgeries(h.bus, str(victim)):
        await publish_raw(h.bus, subject, event)
    honest = ev.new_task_id()
    await h.request(honest)
    await service.run_until_idle()
    # The honest task, requested after the forgeries, was handled: so were they (refused).
    assert "SandboxStarted" in await types_of(h.bus, honest)
    assert (victim / "precious").read_text() == "keep me"
    # Nothing was published for the forgeries: the stream holds them and the honest task's.
    forged = len(forgeries(h.bus, str(victim)))
    info = await h.bus.js.stream_info(h.bus.stream.name)
    assert info.state.messages == forged + len(await types_of(h.bus, honest))

    # Junk as a task's last event does not wedge it: its deadline still ends it.
    short = ev.new_task_id()
    await h.request(short, timeout_s=3)
    await wait_for_event(h.bus, short, "SandboxStarted")
    await h.bus.js.publish(h.bus.subject(short, "SandboxStopped"), b"not an event")
    await wait_for_event(h.bus, short, "TaskTimedOut", timeout=30)
