"""The lifecycle service: the single owner of each task's sandbox (docs/flow.md, steps 2, 4, 6).

Two durable consumers, so that tasks waiting for admission never starve the events that free
their slots:

- ``lifecycle-admit`` (``TaskRequested``): admit (global and per-tenant caps, in order), create
  and start ``sandstream-<task>``, publish ``SandboxStarted``. A waiting message is held with
  ``in_progress()`` heartbeats by the :class:`~shared.worker.Worker`.
- ``lifecycle`` (``ExecutionCompleted``, ``ExecutionFailed``, ``ResultStored``,
  ``TaskCancelRequested``): stop and remove sandboxes (``SandboxStopped`` with usage), close
  tasks with their one terminal event.

Deadlines are in-process timers armed from ``TaskRequested`` (``created_at + timeout_s``) and
re-armed at start-up from the sandbox's ``sandstream.deadline`` label. Every publish uses the
deterministic ids of docs/flow.md, so each step can be repeated safely; events for tasks that
already ended are ignored (apart from making sure their sandbox is gone).

The parts: ``decide`` (what to do about an event, from the task's state; pure), ``sandboxes``
(the engine side), ``deadlines`` (timers), ``admission`` (slots and fair queues); this module
holds the handlers that read a task's state, ask, and carry the answer out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

import structlog

from services.lifecycle import decide
from services.lifecycle.admission import Admission, AdmissionClosed, Withdrawn
from services.lifecycle.deadlines import Deadlines
from services.lifecycle.pool import WarmPool
from services.lifecycle.sandboxes import LABEL_INSTANCE, LABEL_STREAM, LifecycleOptions, Sandboxes
from shared import events as ev
from shared.bus import Bus
from shared.errors import Permanent, Unavailable
from shared.sandbox import SandboxDriver, is_unclaimed, sandbox_name
from shared.settings import Settings
from shared.state import Status, TaskState, apply, fold
from shared.worker import Delivery, Worker

log = structlog.get_logger("sandstream.lifecycle")

__all__ = ["LABEL_INSTANCE", "LABEL_STREAM", "Lifecycle", "LifecycleOptions"]

CONTROL: Final = (
    ev.ExecutionCompleted,
    ev.ExecutionFailed,
    ev.ResultStored,
    ev.StorageFailed,
    ev.TaskCancelRequested,
)
"""What the ``lifecycle`` consumer reads: the events that stop a sandbox or end a task."""


class _Recent:
    """A bounded set: remembers the last ``size`` task ids added."""

    def __init__(self, size: int = 100_000) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, key: str) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items


class Lifecycle:
    """Admits tasks, runs their sandboxes' lives, and ends the tasks.

    ``start()`` reconciles with the engine (reaps orphans, re-occupies slots, re-arms
    deadlines) and starts consuming; ``run()`` is ``start()`` until ``stop()``;
    ``run_until_idle()`` is for tests.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        driver: SandboxDriver,
        settings: Settings,
        options: LifecycleOptions | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.options = options or LifecycleOptions()
        self.admission = Admission(
            max_concurrent=settings.max_concurrent, max_per_tenant=settings.max_per_tenant
        )
        prefix = settings.consumer_prefix
        self.admit_worker = Worker(
            bus=bus,
            durable=f"{prefix}lifecycle-admit",
            subjects=[bus.subject("*", "TaskRequested")],
            handler=self._on_requested,
            on_give_up=self._give_up,
            concurrency=self.options.admit_concurrency or max(64, 8 * settings.max_concurrent),
            ack_wait=settings.ack_wait_s,
            # No delivery count gives a request up: each stop or death of a lifecycle hands
            # every waiting request back (a delivery), and waiting is no failure. A request is
            # bounded by its task's deadline instead: past it, a delivery ends it timed out.
            max_deliver=None,
            max_pending=settings.max_waiting,
        )
        self.control_worker = Worker(
            bus=bus,
            durable=f"{prefix}lifecycle",
            subjects=[bus.subject("*", ev.type_name(t)) for t in CONTROL],
            handler=self._on_control,
            on_give_up=self._give_up,
            concurrency=self.options.control_concurrency,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        self.sandboxes = Sandboxes(driver, settings, self.options, bus.stream.name)
        self.pool = WarmPool(self.sandboxes, self.options.warm_pool)
        self.deadlines = Deadlines(self._expire)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._ended = _Recent()  # terminal event known to be stored
        self._stopped = _Recent()  # sandbox removed by us: never create it again
        self._start_tries: dict[str, int] = {}  # failed sandbox starts of waiting tasks
        self._busy = 0
        self._waiting = 0
        self._stop_requested = asyncio.Event()
        self._runners: list[asyncio.Task[None]] = []
        self._started = False
        self._shut = False

    # ---- running -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the consumers, reconcile with the engine, then start consuming."""
        if self._started:
            return
        self._started = True
        await self.admit_worker.ensure_consumer()
        await self.control_worker.ensure_consumer()
        if self.options.reconcile_on_start:
            await self.reconcile()
        self.pool.start()
        self._runners = [
            asyncio.create_task(self.admit_worker.run(), name="lifecycle-admit"),
            asyncio.create_task(self.control_worker.run(), name="lifecycle-control"),
        ]

    async def run(self) -> None:
        """Run until :meth:`stop` (or until a consumer loop dies, which then raises)."""
        await self.start()
        stop = asyncio.create_task(self._stop_requested.wait())
        try:
            done, _ = await asyncio.wait(
                [stop, *self._runners], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        await self._shutdown()
        for task in done:
            if task is not stop and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work: waiting tasks go back to the stream, in-flight work finishes."""
        self._stop_requested.set()
        await self._shutdown(timeout)

    async def _shutdown(self, timeout: float = 10.0) -> None:
        if self._shut:
            return
        self._shut = True
        self.admission.close()  # waiting handlers give their message back (nak)
        await asyncio.gather(self.admit_worker.stop(timeout), self.control_worker.stop(timeout))
        for runner in self._runners:
            runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        await self.deadlines.close()
        await self.pool.close()
        log.info("lifecycle stopped")

    async def run_until_idle(self, idle_timeout: float = 0.3, timeout: float = 60.0) -> None:
        """Start if needed, then return once nothing is left to do for ``idle_timeout``.

        "Nothing to do": no message pending on either consumer, none in flight except tasks
        waiting for admission, no deadline firing. Armed deadlines do not count.
        """
        await self.start()
        async with asyncio.timeout(timeout):
            quiet_since: float | None = None
            while True:
                if await self._idle():
                    now = time.monotonic()
                    quiet_since = quiet_since or now
                    if now - quiet_since >= idle_timeout:
                        return
                else:
                    quiet_since = None
                await asyncio.sleep(0.05)

    async def _idle(self) -> bool:
        if self._busy:
            return False
        stream = self.bus.stream.name
        admit = await self.bus.js.consumer_info(stream, self.admit_worker.durable)
        control = await self.bus.js.consumer_info(stream, self.control_worker.durable)
        return (
            admit.num_pending == 0
            and control.num_pending == 0
            and control.num_ack_pending == 0
            and admit.num_ack_pending <= self._waiting
            and not self._busy
        )

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def _lock(self, task_id: str) -> asyncio.Lock:
        lock = self._locks.get(task_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[task_id] = lock
        return lock

    # ---- history -----------------------------------------------------------------------------

    async def _open(self, task: str) -> TaskState | None:
        """The task's state while it is open; ``None`` for an unknown task, and for an ended
        one after making sure its sandbox and slot are gone.

        Read without its output batches: nothing here depends on them, and they are most of
        a long task's history.
        """
        state = fold(await self.bus.history(task, types=ev.WITHOUT_OUTPUT))
        if state is None:
            return None
        if state.status.terminal:
            await self._after_end(state)
            return None
        return state

    # ---- TaskRequested ---------------------------------------------------------------------

    async def _on_requested(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        if not isinstance(event, ev.TaskRequested):
            return
        task = event.task_id
        with self._working():
            if task in self._ended:
                return
            if await self.bus.last_of_task(task) != delivery.seq:  # anything after it?
                if (state := await self._open(task)) is None:
                    return
                if state.status not in (Status.QUEUED, Status.STARTING):
                    await self._resume(state)
                    return
            deadline = decide.deadline(event)
            if deadline <= time.time():
                # Expired before we got to it: end it here, so a failure is retried with
                # this message rather than lost with an in-process timer.
                await self._expire(task)
                return
            self._arm(task, deadline)
        self._waiting += 1
        try:
            # A waiting task holds no handler slot: the next tenant's request is still read.
            async with self.admit_worker.parked():
                await self.admission.acquire(task, event.tenant)
        except Withdrawn:
            log.info("left the admission queue", task_id=task)
            return
        except AdmissionClosed:
            raise Unavailable("the lifecycle is shutting down") from None
        finally:
            self._waiting -= 1
        with self._working():
            async with self._lock(task):
                if task in self._ended or task in self._stopped:
                    self.admission.release(task)  # ended or stopped while it waited
                    return
                try:
                    await self._start_sandbox(event, deadline)
                    self._start_tries.pop(task, None)
                except Exception as exc:
                    # Tries are counted here, not by deliveries: a request handed back by a
                    # stopping or dying lifecycle while it waited has not failed.
                    tries = self._start_tries.pop(task, 0) + 1
                    if not isinstance(exc, Permanent) and tries < self.settings.max_deliver:
                        self._start_tries[task] = tries
                        raise
                    if isinstance(exc, Permanent):
                        error = ev.ErrorInfo(code=exc.code, message=str(exc))
                    else:
                        message = f"the sandbox could not be started ({tries} tries): {exc!r}"
                        error = ev.ErrorInfo(code="internal", message=message)
                    log.warning("task failed", code=error.code, message=error.message)
                    queued = fold([event])
                    assert queued is not None
                    await self._end(queued, decide.failed(event, error), have_lock=True)

    async def _start_sandbox(self, event: ev.TaskRequested, deadline: float) -> None:
        task = event.task_id
        began = time.perf_counter()
        claimed = await self.pool.claim(event)
        info = claimed or await self.sandboxes.start(event, deadline)
        if task in self._ended:  # ended while we were starting it: the ender removes it
            return
        await self.bus.publish(
            ev.SandboxStarted(
                event_id=ev.event_id(task, "SandboxStarted"),
                task_id=task,
                tenant=event.tenant,
                causation_id=event.event_id,
                sandbox=info.name,
                image=self.settings.sandbox_image,
            )
        )
        log.info(
            "sandbox started",
            sandbox=info.name,
            adopted=info.adopted,
            pooled=claimed is not None,
            ms=round((time.perf_counter() - began) * 1000, 1),
            running=self.admission.running,
            waiting=self.admission.waiting,
        )

    async def _resume(self, state: TaskState) -> None:
        """A redelivered request for a task already past its start: hold its slot, arm it."""
        if state.status is not Status.RUNNING or state.task_id in self._stopped:
            return  # storing: the sandbox is already gone
        if await self.sandboxes.exists(state.task_id):
            self.admission.occupy(state.task_id, state.tenant)
        self._arm(state.task_id, state.created_at.timestamp() + state.timeout_s)

    # ---- the other events ------------------------------------------------------------------

    async def _on_control(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        if not isinstance(event, CONTROL):
            return
        with self._working():
            if (state := await self._open(event.task_id)) is None:
                return
            await self._carry_out(state, decide.on_event(state, event), event)

    async def _expire(self, task: str) -> None:
        with self._working():
            if (state := await self._open(task)) is None:
                return
            await self._carry_out(state, decide.on_deadline(state), None)

    async def _carry_out(
        self, state: TaskState, decision: decide.Decision, cause: ev.Event | None
    ) -> None:
        if decision.ending is not None:
            await self._end(state, decision.ending)
        elif decision.stop is not None:
            async with self._lock(state.task_id):
                causation = cause.event_id if cause else None
                await self._stop_sandbox(state, decision.stop, causation=causation)

    # ---- endings -----------------------------------------------------------------------------

    async def _end(
        self, state: TaskState, ending: ev.TerminalEvent, *, have_lock: bool = False
    ) -> None:
        """Terminal event first, then the queue and the sandbox: the order of docs/flow.md."""
        await self.bus.publish(ending)
        code = ending.error.code if isinstance(ending, ev.TaskFailed) else None
        log.info("task ended", type=ev.type_name(type(ending)), code=code)
        ended = apply(state, ending)
        assert ended is not None
        await self._after_end(ended, have_lock=have_lock)

    async def _give_up(self, event: ev.AnyEvent, reason: str) -> None:
        """Poison message: the task ends with ``TaskFailed`` (code ``internal``).

        If it had already ended, only its sandbox is cleaned up. Raising here makes the
        worker bring the message back, so a failed clean-up is tried again.
        """
        if (state := await self._open(event.task_id)) is None:
            return
        await self._end(state, decide.failed(event, ev.ErrorInfo(code="internal", message=reason)))

    async def _after_end(self, state: TaskState, *, have_lock: bool = False) -> None:
        """The task has ended: make sure its slot is free and its sandbox gone and reported."""
        task = state.task_id
        self._ended.add(task)
        self._start_tries.pop(task, None)
        self.admission.withdraw(task)
        self.deadlines.disarm(task)
        if state.sandbox_stopped:
            self.admission.release(task)
            if not await self.sandboxes.exists(task):
                return
        stop = self._stop_sandbox(
            state,
            decide.stop_reason(state),
            causation=ev.terminal_id(task),
            publish=not state.sandbox_stopped,
        )
        if have_lock:
            await stop
        else:
            async with self._lock(task):
                await stop

    async def _stop_sandbox(
        self, state: TaskState, reason: str, *, causation: str | None, publish: bool = True
    ) -> None:
        """Usage, ``SandboxStopped``, then remove and release the slot. Call with the lock held.

        The event goes out while the container still exists: a lifecycle killed before the
        publish finds the container (and its cgroup usage) again on the retry, and one killed
        after it leaves a container that the retry, ``_after_end`` or the start-up reaper
        removes. (Removing first lost the usage of a lifecycle killed in between: the chaos
        run found results with zero usage.)
        """
        task = state.task_id
        name = sandbox_name(task)
        usage: ev.Usage | None = None
        if publish:
            usage = await self.sandboxes.usage(task)
            await self.bus.publish(
                ev.SandboxStopped(
                    event_id=ev.event_id(task, "SandboxStopped"),
                    task_id=task,
                    tenant=state.tenant,
                    causation_id=causation,
                    sandbox=name,
                    reason=reason,
                    usage=usage,
                )
            )
        await self.sandboxes.remove(task)
        self._stopped.add(task)
        self.admission.release(task)
        self.deadlines.disarm(task)
        if usage is None:
            log.info("sandbox removed", sandbox=name)
            return
        log.info(
            "sandbox stopped",
            sandbox=name,
            reason=reason,
            cpu_s=round(usage.cpu_seconds, 3),
            mem_peak=usage.memory_peak_bytes,
            wall_ms=usage.wall_ms,
        )

    def _arm(self, task: str, deadline: float) -> None:
        if task not in self._ended and not self._shut:
            self.deadlines.arm(task, deadline)

    # ---- start-up ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Reap sandboxes of ended or unknown tasks; re-occupy slots and re-arm deadlines."""
        reaped = kept = 0
        for info in await self.sandboxes.own():
            task = info.task_id
            if is_unclaimed(info):  # a pool sandbox of an earlier run: the pool makes new ones
                await self.sandboxes.reap(info)
                continue
            with structlog.contextvars.bound_contextvars(task_id=task):
                state = fold(await self.bus.history(task, types=ev.WITHOUT_OUTPUT))
                if state is None:
                    await self.sandboxes.reap(info)
                    log.warning("reaped the sandbox of an unknown task", sandbox=info.name)
                    reaped += 1
                elif state.status.terminal:
                    await self._after_end(state)
                    reaped += 1
                else:
                    self.admission.occupy(task, state.tenant)
                    deadline = info.deadline or state.created_at.timestamp() + state.timeout_s
                    self._arm(task, deadline)
                    kept += 1
        log.info("reconciled with the engine", reaped=reaped, live=kept)
