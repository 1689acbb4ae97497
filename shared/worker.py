"""Durable pull consumers: how every service takes work from the stream.

One place maps a handler's outcome to JetStream:

- returns normally → ``ack``;
- raises :class:`~shared.errors.Retry`, :class:`~shared.errors.Unavailable` or any other
  exception → ``nak`` with a delay that grows with the number of deliveries (a ``Retry`` with
  its own ``delay`` gets that one);
- raises :class:`~shared.errors.Permanent`, or fails on its last allowed delivery → the
  ``on_give_up`` callback publishes an error event, then ``term``;
- delivered again after its last allowed delivery (that handler never finished: the service
  died or was stopped while handling it, perhaps because of this very message) → the same
  give-up, without running the handler again. The consumer itself never drops a message
  (no server-side ``max_deliver``), so nothing disappears without an error event. A worker
  without ``max_deliver`` (the lifecycle's admission, whose requests wait, and are handed
  back at every stop) never gives up for a count: its handler bounds its tries itself;
- an undecodable message, or one :meth:`~shared.bus.Bus.misfiled` (a task id that is not one,
  a subject that is not its task's and type) → ``term``, logged; the handler never sees it;
- ``CancelledError`` is always re-raised: the message is redelivered after ``ack_wait``.

While a handler runs, ``in_progress()`` is sent every third of ``ack_wait`` so long work keeps
its message, and a dead worker's messages come back within ``ack_wait``.

A handler that only waits for something else (the lifecycle's admission) can step aside with
``async with worker.parked():``: while inside, it does not count against ``concurrency``, so
other messages are fetched and handled; its message stays un-acked and heartbeated, so a crash
still brings it back. ``max_pending`` (the consumer's ``max_ack_pending``) bounds how many
messages are out at once, parked ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import events as ev
from shared.bus import Bus
from shared.errors import Permanent, Retry, backoff

log = structlog.get_logger("sandstream.worker")


class Delivery(msgspec.Struct, frozen=True):
    """What a handler may want to know about the message it is handling."""

    seq: int
    subject: str
    num_delivered: int
    max_deliver: int | None
    """``None``: no attempt is the last (the handler bounds its retries itself)."""

    @property
    def last_attempt(self) -> bool:
        return self.max_deliver is not None and self.num_delivered >= self.max_deliver


class Handler(Protocol):
    async def __call__(self, event: ev.AnyEvent, delivery: Delivery) -> None: ...


GiveUp = Callable[[ev.AnyEvent, str], Awaitable[None]]


def default_backoff(num_delivered: int) -> float:
    """Delay before the next delivery: 0.5 s, 1 s, 2 s, … capped at 15 s."""
    return backoff(num_delivered)


class Worker:
    """Runs ``handler`` for every message of a durable consumer, ``concurrency`` at a time."""

    def __init__(
        self,
        *,
        bus: Bus,
        durable: str,
        subjects: Sequence[str],
        handler: Handler,
        on_give_up: GiveUp | None = None,
        concurrency: int = 8,
        ack_wait: float = 10.0,
        max_deliver: int | None = 8,
        max_pending: int | None = None,
        backoff: Callable[[int], float] = default_backoff,
    ) -> None:
        self.bus = bus
        self.durable = durable
        self.subjects = list(subjects)
        self.handler = handler
        self.on_give_up = on_give_up
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.backoff = backoff
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.max_pending = max_pending or max(64, concurrency * 4)
        self._slots = asyncio.Semaphore(concurrency)
        self._parked = 0
        self._slotless: set[asyncio.Task[None]] = set()  # handlers that hold no slot to free
        self._log = log.bind(consumer=durable)

    async def ensure_consumer(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            # Unlimited: the server would drop a message after its last delivery without a
            # trace. The worker gives up itself (see _handle), and a give-up that could not
            # publish its error event comes back until it can.
            max_deliver=-1,
            max_ack_pending=self.max_pending,
            filter_subjects=self.subjects,
        )
        await self.bus.js.add_consumer(self.bus.stream.name, config)

    async def run(self) -> None:
        """Fetch and handle messages until :meth:`stop`; survives NATS restarts."""
        await self.ensure_consumer()
        while not self._stopping.is_set():
            try:
                await self._fetch_loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost subscription is re-created (nats.py issue 504)
                self._log.warning("consumer loop restarting", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=0.5)
        await self._drain_inflight(timeout=None)

    async def run_until_idle(self, idle_timeout: float = 0.3) -> None:
        """Handle messages until none arrives for ``idle_timeout`` and none is in flight.

        For tests: "process everything that is there" without guessing a sleep.
        """
        await self.ensure_consumer()
        while True:
            await self._fetch_loop(fetch_timeout=idle_timeout)
            await self._drain_inflight(timeout=None)
            info = await self.bus.js.consumer_info(self.bus.stream.name, self.durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop fetching; let in-flight messages finish within ``timeout``, then cancel them.

        Returns once the finished messages' acks have reached the server.
        """
        self._stopping.set()
        await self._drain_inflight(timeout=timeout)
        # Acks are sent without waiting for a reply; a flush makes sure the server has them
        # (it answers the flush's PING after everything sent before it).
        with contextlib.suppress(Exception):
            await self.bus.nc.flush(timeout=2)

    async def _drain_inflight(self, timeout: float | None) -> None:
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _fetch_loop(self, *, fetch_timeout: float = 5.0) -> None:
        """Fetch and dispatch until a long poll comes back empty (or we stop)."""
        sub = await self.bus.js.pull_subscribe_bind(
            durable=self.durable, stream=self.bus.stream.name
        )
        try:
            while not self._stopping.is_set():
                free = await self._wait_for_slot()
                # No idle heartbeat on the pull: with one, nats.py's fetch now and then sat
                # on a delivered message for about a second. A silent subscription (after a
                # server restart, nats.py issue 504) is instead replaced after every empty
                # long poll, below.
                fetch = asyncio.ensure_future(sub.fetch(free, timeout=fetch_timeout))
                stopping = asyncio.ensure_future(self._stopping.wait())
                try:
                    await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    # On stop, or when this loop itself is cancelled: end the long poll now
                    # and never leave it behind. A message the server handed to a cancelled
                    # pull comes back to a live worker after ack_wait.
                    stopping.cancel()
                    if not fetch.done():
                        fetch.cancel()
                    await asyncio.gather(fetch, stopping, return_exceptions=True)
                if fetch.cancelled():
                    return
                try:
                    msgs = fetch.result()
                except (nats.errors.TimeoutError, TimeoutError):
                    return  # idle: the caller binds a fresh subscription (or stops)
                for msg in msgs:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(msg))
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @contextlib.asynccontextmanager
    async def parked(self) -> AsyncIterator[None]:
        """Inside, the calling handler gives its slot to other messages (see module docs);
        on the way out it takes a slot again, waiting for one if all are busy."""
        task = asyncio.current_task()
        assert task in self._inflight, "parked() is for this worker's own handlers"
        self._slots.release()
        self._parked += 1
        try:
            yield
        except BaseException:
            self._parked -= 1
            self._slotless.add(task)  # leaving for good: nothing to take, nothing to give back
            raise
        self._parked -= 1
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            self._slotless.add(task)
            raise

    async def _wait_for_slot(self) -> int:
        """Wait until at least one handler slot is free; return how many are."""
        await self._slots.acquire()
        self._slots.release()
        return max(1, self.concurrency - (len(self._inflight) - self._parked))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if task in self._slotless:
            self._slotless.discard(task)
        else:
            self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            self._log.error("handler task crashed", error=repr(task.exception()))

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(
            seq=meta.sequence.stream,
            subject=msg.subject,
            num_delivered=meta.num_delivered,
            max_deliver=self.max_deliver,
        )
        try:
            event = ev.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._log.error("undecodable message terminated", seq=delivery.seq, error=str(exc))
            await msg.term()
            return
        if problem := self.bus.misfiled(delivery.subject, event):
            # Nothing is created, removed or published for it, and it is never retried.
            self._log.error(
                "untrusted event terminated",
                seq=delivery.seq,
                subject=delivery.subject[:200],
                reason=problem,
            )
            await msg.term()
            return
        with structlog.contextvars.bound_contextvars(
            task_id=event.task_id, event_id=event.event_id, seq=delivery.seq
        ):
            if self.max_deliver is not None and delivery.num_delivered > self.max_deliver:
                reason = (
                    f"delivered {delivery.num_delivered} times; its handling never finished "
                    "(the service died or was stopped while handling it)"
                )
                await self._give_up(msg, event, reason)
                return
            heartbeat = asyncio.create_task(self._heartbeat(msg))
            try:
                await self.handler(event, delivery)
            except asyncio.CancelledError:
                raise
            except Permanent as exc:
                await self._give_up(msg, event, f"{exc.code}: {exc}")
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if delivery.last_attempt:
                    await self._give_up(msg, event, reason)
                else:
                    delay = self.backoff(delivery.num_delivered)
                    if isinstance(exc, Retry) and exc.delay is not None:
                        delay = exc.delay  # the handler knows better (e.g. "re-attach now")
                    self._log.warning(
                        "handler failed, will retry",
                        error=reason,
                        attempt=delivery.num_delivered,
                        retry_in_s=delay,
                    )
                    await msg.nak(delay=delay)
            else:
                await msg.ack()
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def _give_up(self, msg: Msg, event: ev.AnyEvent, reason: str) -> None:
        self._log.error("giving up on message", reason=reason)
        if self.on_give_up is not None:
            try:
                await self.on_give_up(event, reason)
            except Exception as exc:
                # The error event could not be published: let the message come back.
                self._log.warning("give-up event not published", error=repr(exc))
                await msg.nak(delay=self.backoff(msg.metadata.num_delivered))
                return
        await msg.term()

    async def _heartbeat(self, msg: Msg) -> None:
        interval = max(0.2, self.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()
