"""The bus and worker contract, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import nats.errors
import pytest
from nats.aio.msg import Msg

from shared import events as ev
from shared.bus import MAX_EVENT_BYTES, Bus, Cursor, StreamSettings, connect
from shared.errors import Conflict, Permanent, Retry, Unavailable
from shared.worker import Delivery, Worker
from tests.support.procs import NatsServer, free_port


def requested(task_id: str, prompt: str = "hi") -> ev.TaskRequested:
    return ev.TaskRequested(
        event_id=ev.event_id(task_id, "TaskRequested"),
        task_id=task_id,
        tenant="acme",
        spec=ev.TaskSpec(prompt=prompt),
    )


def started(task_id: str) -> ev.SandboxStarted:
    return ev.SandboxStarted(
        event_id=ev.event_id(task_id, "SandboxStarted"),
        task_id=task_id,
        tenant="acme",
        sandbox=f"sandstream-{task_id}",
        image="img",
    )


async def test_connect_fails_fast_when_no_server() -> None:
    began = time.monotonic()
    with pytest.raises(Unavailable):
        await connect(f"nats://127.0.0.1:{free_port()}", name="t", connect_timeout=1.0)
    assert time.monotonic() - began < 3


async def test_stream_is_append_only(bus: Bus) -> None:
    info = await bus.js.stream_info(bus.stream.name)
    assert info.config.deny_delete and info.config.deny_purge
    assert info.config.subjects == [f"{bus.prefix}.>"]
    await bus.ensure_stream()  # checking an existing stream is fine


async def test_publish_uses_event_id_for_deduplication(bus: Bus) -> None:
    task = ev.new_task_id()
    first = await bus.publish(requested(task))
    again = await bus.publish(requested(task))
    assert not first.duplicate and again.duplicate
    assert first.seq == again.seq
    assert await bus.last_sequence() == 1


async def test_concurrent_publishes_each_get_their_own_ack(bus: Bus) -> None:
    tasks = [ev.new_task_id() for _ in range(200)]
    acks = await asyncio.gather(*(bus.publish(requested(task)) for task in tasks))
    assert len({ack.seq for ack in acks}) == len(tasks)
    for task, ack in zip(tasks, acks, strict=True):
        stored = await bus.last(task, "TaskRequested")
        assert stored is not None and stored.seq == ack.seq
    assert not bus._acks  # every answer was matched and forgotten


async def test_a_publish_nothing_stores_is_unavailable_at_once(bus: Bus) -> None:
    nowhere = Bus(bus.nc, StreamSettings(name="NOWHERE", subject_prefix="nowhere"))
    with pytest.raises(Unavailable) as refused:  # no stream listens: NATS says so at once
        await nowhere.publish(requested(ev.new_task_id()), timeout=60)
    assert isinstance(refused.value.__cause__, nats.errors.NoRespondersError)
    assert not nowhere._acks


async def test_a_publish_nobody_acknowledges_gives_up_at_its_timeout(bus: Bus) -> None:
    """A listener that is not a stream (no ack): the publish gives up at its timeout, and an
    answer that comes after that leaves the bus as it was."""
    silent = Bus(bus.nc, StreamSettings(name="SILENT", subject_prefix="silent"))
    heard: asyncio.Queue[Msg] = asyncio.Queue()

    async def hear(msg: Msg) -> None:
        await heard.put(msg)

    listener = await bus.nc.subscribe("silent.>", cb=hear)
    try:
        with pytest.raises(Unavailable) as refused:
            await silent.publish(requested(ev.new_task_id()), timeout=0.3)
        assert isinstance(refused.value.__cause__, TimeoutError)
        assert not silent._acks
        late = await asyncio.wait_for(heard.get(), 10)
        await bus.nc.publish(late.reply, b'{"stream": "SILENT", "seq": 1}')
        await bus.nc.flush()
        # Still usable: the next publish to the real stream is acknowledged.
        assert (await bus.publish(requested(ev.new_task_id()))).seq > 0
    finally:
        await listener.unsubscribe()


async def test_expected_sequence_guards_the_whole_task(bus: Bus) -> None:
    task = ev.new_task_id()
    ack = await bus.publish(requested(task), expected_last_subject_seq=0)
    with pytest.raises(Conflict):
        await bus.publish(requested(task, "other"), msg_id="x", expected_last_subject_seq=0)
    # a different subject of the same task is still guarded by the wildcard form
    with pytest.raises(Conflict):
        await bus.publish(started(task), expected_last_subject_seq=ack.seq + 5)
    await bus.publish(started(task), expected_last_subject_seq=ack.seq)


async def test_read_history_in_order_and_from_sequence(bus: Bus) -> None:
    a, b = ev.new_task_id(), ev.new_task_id()
    for event in (requested(a), requested(b), started(a), started(b)):
        await bus.publish(event)
    seen = [
        (r.seq, r.event.task_id, type(r.event).__name__) async for r in bus.read(bus.task_filter(a))
    ]
    assert seen == [(1, a, "TaskRequested"), (3, a, "SandboxStarted")]
    tail = [r.seq async for r in bus.read(from_seq=3)]
    assert tail == [3, 4]
    assert [r async for r in bus.read(bus.task_filter(ev.new_task_id()))] == []


async def test_last_on_subject(bus: Bus) -> None:
    task = ev.new_task_id()
    assert await bus.last(task, "TaskRequested") is None
    await bus.publish(requested(task, "look"))
    record = await bus.last(task, "TaskRequested")
    assert record is not None and isinstance(record.event, ev.TaskRequested)
    assert record.event.spec.prompt == "look"


async def test_worker_acks_retries_and_gives_up(bus: Bus) -> None:
    ok, flaky, bad = ev.new_task_id(), ev.new_task_id(), ev.new_task_id()
    calls: dict[str, int] = {}
    given_up: list[tuple[str, str]] = []

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        calls[event.task_id] = calls.get(event.task_id, 0) + 1
        if event.task_id == flaky and delivery.num_delivered < 3:
            raise RuntimeError("transient")
        if event.task_id == bad:
            raise Permanent("cannot ever work", code="invalid")

    async def give_up(event: ev.AnyEvent, reason: str) -> None:
        given_up.append((event.task_id, reason))

    worker = Worker(
        bus=bus,
        durable="w1",
        subjects=[f"{bus.prefix}.*.TaskRequested"],
        handler=handler,
        on_give_up=give_up,
        backoff=lambda n: 0.05,
    )
    for t in (ok, flaky, bad):
        await bus.publish(requested(t))
    await worker.run_until_idle()
    assert calls == {ok: 1, flaky: 3, bad: 1}
    assert given_up == [(bad, "invalid: cannot ever work")]


async def test_worker_gives_up_after_max_deliver(bus: Bus) -> None:
    task = ev.new_task_id()
    given_up: list[str] = []

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        raise RuntimeError("always")

    async def give_up(event: ev.AnyEvent, reason: str) -> None:
        given_up.append(reason)

    worker = Worker(
        bus=bus,
        durable="w2",
        subjects=[f"{bus.prefix}.>"],
        handler=handler,
        on_give_up=give_up,
        max_deliver=3,
        backoff=lambda n: 0.05,
    )
    await bus.publish(requested(task))
    await worker.run_until_idle()
    assert given_up == ["RuntimeError: always"]


async def test_a_message_whose_handling_never_finishes_ends_with_a_give_up(bus: Bus) -> None:
    """A handler that never finishes (its service dies each time, as under the chaos run's
    kills) used to be dropped by the server after max_deliver + 3 deliveries, silently: now the
    delivery after the last allowed one gives up (error event) without running it again."""
    task = ev.new_task_id()
    calls: list[int] = []
    given_up: list[str] = []

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        calls.append(delivery.num_delivered)
        await asyncio.Event().wait()  # until the "service dies"

    async def give_up(event: ev.AnyEvent, reason: str) -> None:
        given_up.append(reason)

    def worker() -> Worker:
        return Worker(
            bus=bus,
            durable="w5",
            subjects=[f"{bus.prefix}.>"],
            handler=handler,
            on_give_up=give_up,
            ack_wait=0.5,
            max_deliver=2,
        )

    await bus.publish(requested(task))
    async with asyncio.timeout(20):
        for _ in range(2):  # two deliveries, each "killed" while it is being handled
            w = worker()
            runner = asyncio.create_task(w.run())
            handled = len(calls)
            while len(calls) == handled:
                await asyncio.sleep(0.02)
            await w.stop(timeout=0)  # the handler is cancelled: no ack, no nak
            await runner
        w = worker()
        runner = asyncio.create_task(w.run())
        while not given_up:
            await asyncio.sleep(0.02)
        await w.stop(timeout=1)
        await runner
        info = await bus.js.consumer_info(bus.stream.name, "w5")
    assert calls == [1, 2]
    assert len(given_up) == 1 and "delivered 3 times" in given_up[0]
    assert info is not None and info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_retry_with_its_own_delay_is_redelivered_after_that_delay(bus: Bus) -> None:
    """The worker's backoff would wait a minute; the handler's ``Retry(delay=...)`` wins."""
    task = ev.new_task_id()
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            raise Retry("again, at once", delay=0.05)
        done.set()

    worker = Worker(
        bus=bus, durable="wretry", subjects=[f"{bus.prefix}.>"], handler=handler,
        backoff=lambda n: 60.0,
    )  # fmt: skip
    runner = asyncio.create_task(worker.run())
    try:
        await bus.publish(requested(task))
        await asyncio.wait_for(done.wait(), 10)
        assert deliveries == [1, 2]
    finally:
        await worker.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_a_read_with_several_subjects_gets_only_those(bus: Bus) -> None:
    task = ev.new_task_id()
    await bus.publish(requested(task))
    for n in range(3):
        await bus.publish(
            ev.AgentOutput(
                event_id=ev.event_id(task, "AgentOutput", n),
                task_id=task,
                tenant="acme",
                batch=n,
                lines=["x"],
            )
        )
    await bus.publish(
        ev.TaskCancelRequested(
            event_id=ev.event_id(task, "TaskCancelRequested"), task_id=task, tenant="acme"
        )
    )
    cursor = Cursor()
    subjects = [bus.subject(task, "TaskRequested"), bus.subject(task, "TaskCancelRequested")]
    got = [type(r.event) async for r in bus.read(subjects=subjects, cursor=cursor)]
    assert got == [ev.TaskRequested, ev.TaskCancelRequested]
    assert cursor.caught_up and cursor.seq == await bus_last_seq(bus, task)


async def bus_last_seq(bus: Bus, task: str) -> int:
    raw = await bus.js.get_last_msg(bus.stream.name, bus.task_filter(task), direct=True)
    return int(raw.seq or 0)


async def test_a_parked_handler_frees_its_slot_and_keeps_its_message(bus: Bus) -> None:
    """One handler slot. The first message parks (it waits for something else): the second is
    handled meanwhile. The parked one is still un-acked, then finishes and is acked once."""
    first, second = ev.new_task_id(), ev.new_task_id()
    release = asyncio.Event()
    handled: list[str] = []
    worker: Worker

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        if event.task_id == first:
            async with worker.parked():
                await release.wait()
        handled.append(event.task_id)

    worker = Worker(
        bus=bus, durable="wpark", subjects=[f"{bus.prefix}.>"], handler=handler, concurrency=1
    )
    runner = asyncio.create_task(worker.run())
    try:
        await bus.publish(requested(first))
        await bus.publish(requested(second))
        async with asyncio.timeout(10):
            while handled != [second]:
                await asyncio.sleep(0.02)
        info = await bus.js.consumer_info(bus.stream.name, "wpark")
        assert info.num_ack_pending == 1  # the parked message, kept
        release.set()
        async with asyncio.timeout(10):
            while (await bus.js.consumer_info(bus.stream.name, "wpark")).num_ack_pending:
                await asyncio.sleep(0.02)
        assert handled == [second, first]
    finally:
        await worker.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_worker_heartbeats_keep_long_work(bus: Bus) -> None:
    """Work longer than ack_wait keeps its message: a second worker polling the same
    consumer all along never receives it (without heartbeats it would, after ack_wait)."""
    task = ev.new_task_id()
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        if len(deliveries) == 1:
            await asyncio.sleep(2.5)  # the work itself takes this long; ack_wait is 1 s
            done.set()

    workers = [
        Worker(bus=bus, durable="w3", subjects=[f"{bus.prefix}.>"], handler=handler, ack_wait=1.0)
        for _ in range(2)
    ]
    runners = [asyncio.create_task(w.run()) for w in workers]
    await bus.publish(requested(task))
    await asyncio.wait_for(done.wait(), 10)
    for worker in workers:
        await worker.stop(timeout=5)
    await asyncio.gather(*runners)
    assert deliveries == [1]


async def test_graceful_stop_finishes_inflight(bus: Bus) -> None:
    task = ev.new_task_id()
    began, finished = asyncio.Event(), asyncio.Event()

    async def handler(event: ev.AnyEvent, delivery: Delivery) -> None:
        began.set()
        await asyncio.sleep(0.3)
        finished.set()

    worker = Worker(bus=bus, durable="w4", subjects=[f"{bus.prefix}.>"], handler=handler)
    runner = asyncio.create_task(worker.run())
    await bus.publish(requested(task))
    await asyncio.wait_for(began.wait(), 10)
    await worker.stop(timeout=5)
    await asyncio.wait_for(runner, 10)
    assert finished.is_set()
    info = await bus.js.consumer_info(bus.stream.name, "w4")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_follow_read_survives_a_nats_restart_without_repeating_history(
    tmp_path: Path,
) -> None:
    """nats.py re-creates an ordered consumer that lost its server from "last delivered + 1",
    which is 1 when nothing was delivered yet: a read from sequence N (an SSE client's
    Last-Event-ID) was sent the history again. Found by the chaos run."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        nc = await connect(server.url, name="test", auth=server.auth())
        bus = Bus(nc, StreamSettings(name="RESTART", subject_prefix="restart"))
        await bus.ensure_stream()
        task = ev.new_task_id()
        await bus.publish(requested(task))
        await bus.publish(started(task))
        seen: list[tuple[int, str]] = []

        async def follow() -> None:
            async for r in bus.read(
                bus.task_filter(task), from_seq=3, follow=True, idle_heartbeat=0.5
            ):
                seen.append((r.seq, ev.type_name(type(r.event))))

        reader = asyncio.create_task(follow())
        async with asyncio.timeout(10):  # its ordered consumer exists on the server
            while (await bus.js.stream_info(bus.stream.name)).state.consumer_count < 1:
                await asyncio.sleep(0.02)
        server.kill()
        # The scenario itself: stay down for more than two missed heartbeats (0.5 s each),
        # so nats.py re-creates the consumer, which is where history came back.
        await asyncio.sleep(1.5)
        server.start()
        ended = ev.TaskCancelled(event_id=ev.terminal_id(task), task_id=task, tenant="acme")
        # After the end, one more event of the task: it arrives after anything replayed, so
        # once it is seen, a replay would have been seen too.
        late = ev.TaskCancelRequested(
            event_id=ev.event_id(task, "TaskCancelRequested"), task_id=task, tenant="acme"
        )
        async with asyncio.timeout(20):
            while True:
                try:
                    await bus.publish(ended)
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)
            await bus.publish(late)
            while not any(name == "TaskCancelRequested" for _, name in seen):
                await asyncio.sleep(0.02)
        reader.cancel()
        assert seen == [(3, "TaskCancelled"), (4, "TaskCancelRequested")]
        await nc.close()
    finally:
        server.stop()


async def test_the_stream_refuses_an_event_over_its_max_msg_size(bus: Bus) -> None:
    info = await bus.js.stream_info(bus.stream.name)
    assert info.config.max_msg_size == MAX_EVENT_BYTES
    task_id = ev.new_task_id()
    huge = ev.AgentOutput(
        event_id=ev.event_id(task_id, "AgentOutput", 0),
        task_id=task_id,
        tenant="t",
        batch=0,
        lines=["x" * (MAX_EVENT_BYTES + 1)],
    )
    with pytest.raises(Exception):  # noqa: B017 - whichever error NATS raises, it is refused
        await bus.publish(huge)
    assert await bus.last(task_id, "AgentOutput") is None


async def test_a_large_history_is_read_whole_by_a_slow_reader(bus: Bus) -> None:
    """40 MiB of one task's output, read by a caller slower than the server: every event
    arrives once, in order (the read-ahead is bounded; flow control holds the server back)."""
    task_id = ev.new_task_id()
    line = "x" * (250 * 1024)
    for i in range(160):
        await bus.publish(
            ev.AgentOutput(
                event_id=ev.event_id(task_id, "AgentOutput", i),
                task_id=task_id,
                tenant="t",
                batch=i,
                lines=[line],
            )
        )
    seen = []
    async with asyncio.timeout(60):
        async for record in bus.read(bus.task_filter(task_id)):
            assert isinstance(record.event, ev.AgentOutput)
            seen.append(record.event.batch)
            if len(seen) % 20 == 0:
                await asyncio.sleep(0.05)  # a slow consumer: the server must wait for it
    assert seen == list(range(160))
