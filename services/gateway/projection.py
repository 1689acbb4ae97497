"""The gateway's view of every task: a fold of the whole stream, kept live.

It is rebuilt from the stream at start-up (the gateway is "ready" once it has caught up with
the stream as it was when it started) and then follows new events. Waiters (``?wait``,
``POST /execute``) are woken by events, never by polling.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable

import structlog

from shared import state
from shared.bus import Bus, Record
from shared.events import AnyEvent
from shared.state import TaskState

log = structlog.get_logger("sandstream.projection")


class Projection:
    def __init__(self, on_event: Callable[[AnyEvent], None] | None = None) -> None:
        self.on_event = on_event
        """Also told of every event, once (the metrics' stage times)."""
        self.tasks: dict[str, TaskState] = {}
        self.by_tenant: dict[str, list[str]] = defaultdict(list)
        self.open_by_tenant: Counter[str] = Counter()  # tasks not yet terminal
        self.last_seq = 0
        self.ready = asyncio.Event()
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    def get(self, tenant: str, task_id: str) -> TaskState | None:
        """The task if it exists *and* belongs to ``tenant``: other tenants see nothing."""
        task = self.tasks.get(task_id)
        return task if task is not None and task.tenant == tenant else None

    def apply(self, record: Record) -> None:
        if record.seq <= self.last_seq:
            return  # replayed after a reconnect
        self.last_seq = record.seq
        event = record.event
        if self.on_event is not None:
            self.on_event(event)
        before = self.tasks.get(event.task_id)
        after = state.apply(before, event)
        if after is None or after is before:
            return
        if before is None:
            self.by_tenant[after.tenant].append(after.task_id)
        was_open = before is not None and not before.status.terminal
        if was_open != (not after.status.terminal):
            self.open_by_tenant[after.tenant] += -1 if was_open else 1
        self.tasks[event.task_id] = after
        for woken in self._waiting.pop(event.task_id, ()):
            _wake(woken)

    async def wait_until(
        self, task_id: str, done: Callable[[TaskState], bool], timeout: float
    ) -> TaskState | None:
        """Wait up to ``timeout`` seconds for ``done(task)``; return the task's latest state.

        Woken by the task's own events, never by polling.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            task = self.tasks.get(task_id)
            if (task is not None and done(task)) or loop.time() >= deadline:
                return task
            # A future and a timer, not ``wait_for``: on every submission (read-your-writes),
            # and ``wait_for`` makes a task of its own for each wait.
            woken: asyncio.Future[None] = loop.create_future()
            waiting = self._waiting.setdefault(task_id, set())
            waiting.add(woken)
            timer = loop.call_at(deadline, _wake, woken)
            try:
                await woken
            finally:
                timer.cancel()
                waiting.discard(woken)
                if not waiting and self._waiting.get(task_id) is waiting:
                    del self._waiting[task_id]

    async def wait_for_task(self, task_id: str, timeout: float) -> TaskState | None:
        """Wait until the projection has seen the task at all (after our own publish)."""
        return await self.wait_until(task_id, lambda _: True, timeout)

    async def wait_terminal(self, task_id: str, timeout: float) -> TaskState | None:
        return await self.wait_until(task_id, lambda t: t.status.terminal, timeout)

    async def wait_stored(self, task_id: str, timeout: float) -> TaskState | None:
        """Wait for the end *and* the stored result (timeouts and cancels store after ending)."""
        task = await self.wait_until(
            task_id, lambda t: t.status.terminal and t.result_location is not None, timeout
        )
        return task if task is not None and task.status.terminal else None

    async def follow(self, bus: Bus) -> None:
        """Fold the stream from the start, then live; survives NATS restarts."""
        while True:
            try:
                target = await bus.last_sequence()
                if self.last_seq >= target:
                    self.ready.set()
                async for record in bus.read(from_seq=self.last_seq + 1, follow=True):
                    self.apply(record)
                    if not self.ready.is_set() and self.last_seq >= target:
                        self.ready.set()
                        log.info("projection rebuilt", tasks=len(self.tasks), seq=self.last_seq)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("projection reader restarting", error=str(exc))
                await asyncio.sleep(0.5)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
