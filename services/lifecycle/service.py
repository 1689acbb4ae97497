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
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
import structlog

from services.lifecycle.admission import Admission, AdmissionClosed, Withdrawn
from shared import events as ev
from shared.bus import Bus, Cursor
from shared.errors import Permanent, Unavailable, backoff
from shared.sandbox import (
    MANAGED_FILTER,
    GiB,
    MiB,
    SandboxDriver,
    SandboxSpec,
    sandbox_name,
    share_with_sandbox,
    socket_folder,
)
from shared.settings import Settings
from shared.state import Status, TaskState, fold
from shared.worker import Delivery, Worker

log = structlog.get_logger("sandstream.lifecycle")

LABEL_STREAM: Final = "sandstream.stream"
"""Which event stream a sandbox belongs to: a lifecycle only ever reaps its own stream's."""
LABEL_INSTANCE: Final = "sandstream.instance"
"""The installation (``settings.instance``, set by ``sandstream up``) that owns the sandbox."""

CONTROL_EVENTS: Final = (
    "ExecutionCompleted",
    "ExecutionFailed",
    "ResultStored",
    "StorageFailed",
    "TaskCancelRequested",
)

HISTORY_TYPES: Final = tuple(ev.type_name(t) for t in ev.EVENT_TYPES if t is not ev.AgentOutput)
"""What the lifecycle reads of a task's history: everything but its output batches."""

_STOP_REASON: Final[dict[type[ev.Event], str]] = {
    ev.TaskSucceeded: "completed",
    ev.TaskFailed: "failed",
    ev.TaskCancelled: "cancelled",
    ev.TaskTimedOut: "timeout",
}


class LifecycleOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Sandbox limits and worker sizing; the defaults suit one machine."""

    memory_bytes: int = GiB
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 256
    tmp_size_bytes: int = 512 * MiB
    workspace: str = "tmpfs"
    workspace_size_bytes: int = GiB
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra labels on every sandbox (tests use one to find and clean up their own)."""
    admit_concurrency: int | None = None
    """``TaskRequested`` messages in hand at once, waiting ones included (default: 8 × cap)."""
    control_concurrency: int = 16
    reconcile_on_start: bool = True


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
        self.driver = driver
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
            max_deliver=settings.max_deliver,
            max_pending=settings.max_waiting,
        )
        self.control_worker = Worker(
            bus=bus,
            durable=f"{prefix}lifecycle",
            subjects=[bus.subject("*", name) for name in CONTROL_EVENTS],
            handler=self._on_control,
            on_give_up=self._give_up,
            concurrency=self.options.control_concurrency,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._ended = _Recent()  # terminal event known to be stored
        self._stopped = _Recent()  # sandbox removed by us: never create it again
        self._usage: dict[str, ev.Usage] = {}  # read before removal, kept until published
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._busy = 0
        self._waiting = 0
        self._stop_requested = asyncio.Event()
        self._runners: list[asyncio.Task[None]] = []
        self._started = False
        self._shut = False

    # ---- running -----------------------------------------------------------------------------

    @property
    def stream_label(self) -> str:
        return f"{LABEL_STREAM}={self.bus.stream.name}"

    async def start(self) -> None:
        """Create the consumers, reconcile with the engine, then start consuming."""
        if self._started:
            return
        self._started = True
        await self.admit_worker.ensure_consumer()
        await self.control_worker.ensure_consumer()
        if self.options.reconcile_on_start:
            await self.reconcile()
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

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from a signal handler)."""
        self._stop_requested.set()

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
        timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
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

    async def _history(self, task_id: str, tries: int = 3) -> list[ev.AnyEvent]:
        """The task's events but its output batches (nothing here depends on them, and they
        are most of a long task's history), checked to reach its last stored one.

        Decisions here are destructive (an "unknown" task's sandbox is removed), so a read
        that stops short of the last sequence is read again, then :class:`Unavailable`.
        """
        last, last_subject = await self._last(task_id)
        if last == 0:
            return []
        subjects = [self.bus.subject(task_id, name) for name in HISTORY_TYPES]
        if last_subject not in subjects:  # output (or a type unknown here): not read
            last = 1  # the read cannot reach it: it must just not come back empty
        for _ in range(tries):
            cursor = Cursor()
            try:
                records = [r async for r in self.bus.read(subjects=subjects, cursor=cursor)]
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"cannot read the history of {task_id}: {exc}") from exc
            # Up to the last stored event, even when that one was skipped as untrusted.
            if cursor.caught_up and cursor.seq >= last:
                return [r.event for r in records]
            log.warning("history read incomplete, reading again", task_id=task_id)
        raise Unavailable(f"the history of {task_id} came back incomplete")

    async def _open(self, task: str) -> tuple[TaskState, list[ev.AnyEvent]] | None:
        """The task's state and history while it is open; ``None`` for an unknown task, and
        for an ended one after making sure its sandbox and slot are gone."""
        history = await self._history(task)
        state = fold(history)
        if state is None:
            return None
        if state.status.terminal:
            await self._after_end(task, state, history)
            return None
        return state, history

    async def _last_seq(self, task_id: str) -> int:
        """Stream sequence of the task's last event, 0 if it has none (one direct get)."""
        return (await self._last(task_id))[0]

    async def _last(self, task_id: str) -> tuple[int, str]:
        """Sequence and subject of the task's last event; ``(0, "")`` if it has none."""
        try:
            raw = await self.bus.js.get_last_msg(
                self.bus.stream.name, self.bus.task_filter(task_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return 0, ""
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise Unavailable("the event log (NATS) did not answer in time") from exc
        return int(raw.seq or 0), str(raw.subject or "")

    # ---- TaskRequested ---------------------------------------------------------------------

    async def _on_requested(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        if not isinstance(event, ev.TaskRequested):
            return
        task = event.task_id
        with self._working():
            if task in self._ended:
                return
            if await self._last_seq(task) != delivery.seq:  # anything after the request?
                if (open_task := await self._open(task)) is None:
                    return
                state, _ = open_task
                if state.status not in (Status.QUEUED, Status.STARTING):
                    await self._resume(state)
                    return
            deadline = ev_deadline(event)
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
                    await self._create_and_start(event, deadline)
                except Permanent as exc:
                    error = ev.ErrorInfo(code=exc.code, message=str(exc))
                    await self._fail(event, error, have_lock=True)

    async def _create_and_start(self, event: ev.TaskRequested, deadline: float) -> None:
        task = event.task_id
        began = time.perf_counter()
        socket_dir = socket_folder(self.settings.model_socket_dir, task)
        socket_dir.mkdir(parents=True, exist_ok=True)
        share_with_sandbox(socket_dir)
        o = self.options
        spec = SandboxSpec(
            task_id=task,
            tenant=event.tenant,
            image=self.settings.sandbox_image,
            deadline=deadline,
            labels=self._labels(),
            memory_bytes=o.memory_bytes,
            nano_cpus=o.nano_cpus,
            pids_limit=o.pids_limit,
            tmp_size_bytes=o.tmp_size_bytes,
            workspace=o.workspace,
            workspace_size_bytes=o.workspace_size_bytes,
            model_socket_dir=str(socket_dir),
        )
        info = await self.driver.create(spec)
        if info.state != "running":
            await self.driver.start(info.name)
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
            ms=round((time.perf_counter() - began) * 1000, 1),
            running=self.admission.running,
            waiting=self.admission.waiting,
        )

    def _labels(self) -> dict[str, str]:
        labels = {**self.options.labels, LABEL_STREAM: self.bus.stream.name}
        if self.settings.instance:
            labels[LABEL_INSTANCE] = self.settings.instance
        return labels

    async def _resume(self, state: TaskState) -> None:
        """A redelivered request for a task already past its start: hold its slot, arm it."""
        if state.status is not Status.RUNNING or state.task_id in self._stopped:
            return  # storing: the sandbox is already gone
        if await self.driver.inspect(sandbox_name(state.task_id)) is not None:
            self.admission.occupy(state.task_id, state.tenant)
        self._arm(state.task_id, state.created_at.timestamp() + state.timeout_s)

    # ---- the other events ------------------------------------------------------------------

    async def _on_control(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        with self._working():
            match event:
                case ev.ExecutionCompleted() | ev.ExecutionFailed():
                    await self._on_execution_end(event)
                case ev.ResultStored():
                    await self._on_result_stored(event)
                case ev.TaskCancelRequested():
                    await self._on_cancel(event)
                case ev.StorageFailed():
                    await self._on_storage_failed(event)
                case _:
                    return

    async def _on_execution_end(self, event: ev.ExecutionCompleted | ev.ExecutionFailed) -> None:
        task = event.task_id
        if (open_task := await self._open(task)) is None:
            return
        state, _ = open_task
        reason = "completed" if isinstance(event, ev.ExecutionCompleted) else "failed"
        async with self._lock(task):
            await self._stop_sandbox(task, state.tenant, reason, causation=event.event_id)

    async def _on_result_stored(self, event: ev.ResultStored) -> None:
        error = None if event.status == "succeeded" else event.error or _unexplained(event)
        await self._close(event, error)

    async def _on_storage_failed(self, event: ev.StorageFailed) -> None:
        await self._close(event, event.error)

    async def _close(
        self, cause: ev.ResultStored | ev.StorageFailed, error: ev.ErrorInfo | None
    ) -> None:
        """The result step is over: end the open task, ``TaskSucceeded`` when there is no
        error, else ``TaskFailed`` with the error as storage decided it (copied, never derived)."""
        task = cause.task_id
        if (open_task := await self._open(task)) is None:
            return
        state, history = open_task
        common: dict[str, Any] = {
            "event_id": ev.terminal_id(task),
            "task_id": task,
            "tenant": state.tenant,
            "causation_id": cause.event_id,
        }
        terminal = (
            ev.TaskSucceeded(**common) if error is None else ev.TaskFailed(**common, error=error)
        )
        await self.bus.publish(terminal)
        log.info("task ended", type=ev.type_name(type(terminal)), code=error and error.code)
        # Normally the sandbox is long gone; make sure of it (and of its slot).
        await self._after_end(task, state, [*history, terminal])

    async def _on_cancel(self, event: ev.TaskCancelRequested) -> None:
        task = event.task_id
        if (open_task := await self._open(task)) is None:
            return
        state, _ = open_task
        ending = ev.TaskCancelled(
            event_id=ev.terminal_id(task),
            task_id=task,
            tenant=state.tenant,
            causation_id=event.event_id,
            reason=event.reason,
        )
        await self._end(ending, state.tenant, "cancelled")

    # ---- endings -----------------------------------------------------------------------------

    async def _end(
        self, ending: ev.Event, tenant: str, reason: str, *, have_lock: bool = False
    ) -> None:
        """Terminal event first, then the queue/sandbox: the order of docs/flow.md."""
        task = ending.task_id
        await self.bus.publish(ending)
        self._ended.add(task)
        log.info("task ended", type=ev.type_name(type(ending)))
        self.admission.withdraw(task)
        if have_lock:
            await self._stop_sandbox(task, tenant, reason, causation=ending.event_id)
        else:
            async with self._lock(task):
                await self._stop_sandbox(task, tenant, reason, causation=ending.event_id)

    async def _fail(self, cause: ev.Event, error: ev.ErrorInfo, *, have_lock: bool = False) -> None:
        ending = ev.TaskFailed(
            event_id=ev.terminal_id(cause.task_id),
            task_id=cause.task_id,
            tenant=cause.tenant,
            causation_id=cause.event_id,
            error=error,
        )
        log.warning("task failed", code=error.code, message=error.message)
        await self._end(ending, cause.tenant, "failed", have_lock=have_lock)

    async def _give_up(self, event: ev.AnyEvent, reason: str) -> None:
        """Poison message: the task ends with ``TaskFailed`` (code ``internal``).

        If it had already ended, only its sandbox is cleaned up. Raising here makes the
        worker bring the message back, so a failed clean-up is tried again.
        """
        history = await self._history(event.task_id)
        state = fold(history)
        if state is not None and state.status.terminal:
            await self._after_end(event.task_id, state, history)
            return
        await self._fail(event, ev.ErrorInfo(code="internal", message=reason))

    async def _after_end(self, task: str, state: TaskState, history: list[ev.AnyEvent]) -> None:
        """The task has ended: only make sure its sandbox is gone and reported."""
        self._ended.add(task)
        self.admission.withdraw(task)
        self._disarm(task)
        stopped = any(isinstance(e, ev.SandboxStopped) for e in history)
        if stopped:
            self.admission.release(task)
            if await self.driver.inspect(sandbox_name(task)) is None:
                return
        ending = next((e for e in reversed(history) if ev.is_terminal(e)), None)
        reason = _STOP_REASON.get(type(ending), "failed") if ending else "failed"
        causation = ending.event_id if ending else None
        async with self._lock(task):
            await self._stop_sandbox(
                task, state.tenant, reason, causation=causation, publish=not stopped
            )

    async def _stop_sandbox(
        self,
        task: str,
        tenant: str,
        reason: str,
        *,
        causation: str | None,
        publish: bool = True,
    ) -> None:
        """Usage, ``SandboxStopped``, then remove and release the slot. Call with the lock held.

        The event goes out while the container still exists: a lifecycle killed before the
        publish finds the container (and its cgroup usage) again on the retry, and one killed
        after it leaves a container that the retry, ``_after_end`` or the start-up reaper
        removes. (Removing first lost the usage of a lifecycle killed in between: the chaos
        run found results with zero usage.) Usage is kept until published, so a retry after
        a failed publish reports the same figures.
        """
        name = sandbox_name(task)
        usage: ev.Usage | None = None
        if publish:
            usage = self._usage.get(task)
            if usage is None:
                usage = await self.driver.usage(name)
                if not usage.image:
                    usage = msgspec.structs.replace(usage, image=self.settings.sandbox_image)
                self._usage[task] = usage
            await self.bus.publish(
                ev.SandboxStopped(
                    event_id=ev.event_id(task, "SandboxStopped"),
                    task_id=task,
                    tenant=tenant,
                    causation_id=causation,
                    sandbox=name,
                    reason=reason,
                    usage=usage,
                )
            )
        await self.driver.remove(name)
        self._usage.pop(task, None)
        self._stopped.add(task)
        self.admission.release(task)
        self._disarm(task)
        with contextlib.suppress(OSError):
            shutil.rmtree(socket_folder(self.settings.model_socket_dir, task))
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

    # ---- deadlines ---------------------------------------------------------------------------

    def _arm(self, task: str, deadline: float) -> None:
        if task in self._timers or task in self._ended or self._shut:
            return
        self._timers[task] = asyncio.create_task(self._deadline(task, deadline), name=task)

    def _disarm(self, task: str) -> None:
        timer = self._timers.pop(task, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    async def _deadline(self, task: str, deadline: float) -> None:
        with structlog.contextvars.bound_contextvars(task_id=task):
            try:
                await asyncio.sleep(max(0.0, deadline - time.time()))
                attempt = 0
                while True:
                    attempt += 1
                    try:
                        with self._working():
                            await self._expire(task)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        delay = backoff(attempt)
                        log.warning("timeout handling failed, retrying", error=repr(exc))
                        await asyncio.sleep(delay)
            finally:
                if self._timers.get(task) is asyncio.current_task():
                    del self._timers[task]

    async def _expire(self, task: str) -> None:
        if (open_task := await self._open(task)) is None:
            return
        state, _ = open_task
        if state.status is Status.STORING:
            return  # the sandbox is already stopped: the result is being stored
        ending = ev.TaskTimedOut(
            event_id=ev.terminal_id(task),
            task_id=task,
            tenant=state.tenant,
            causation_id=ev.event_id(task, "TaskRequested"),
            timeout_s=state.timeout_s,
        )
        await self._end(ending, state.tenant, "timeout")

    # ---- start-up ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Reap sandboxes of ended or unknown tasks; re-occupy slots and re-arm deadlines.

        Only this installation's sandboxes are looked at (same stream and, when set, same
        ``instance``): another installation sharing the engine has tasks we do not know.
        """
        filters = [MANAGED_FILTER, self.stream_label]
        if self.settings.instance:
            filters.append(f"{LABEL_INSTANCE}={self.settings.instance}")
        sandboxes = await self.driver.list(filters)
        reaped = kept = 0
        for info in sandboxes:
            task = info.task_id
            with structlog.contextvars.bound_contextvars(task_id=task):
                history = await self._history(task)
                state = fold(history)
                if state is None:
                    await self.driver.remove(info.name)
                    log.warning("reaped the sandbox of an unknown task", sandbox=info.name)
                    reaped += 1
                elif state.status.terminal:
                    await self._after_end(task, state, history)
                    reaped += 1
                else:
                    self.admission.occupy(task, state.tenant)
                    deadline = info.deadline or state.created_at.timestamp() + state.timeout_s
                    self._arm(task, deadline)
                    kept += 1
        log.info("reconciled with the engine", reaped=reaped, live=kept)


def ev_deadline(event: ev.TaskRequested) -> float:
    return event.at.timestamp() + event.spec.timeout_s


def _unexplained(stored: ev.ResultStored) -> ev.ErrorInfo:
    """The error of a ``ResultStored`` written before it carried one (shared/outcome.py)."""
    return ev.ErrorInfo(
        code=stored.status,
        message=f"the result was stored with status {stored.status!r}",
    )
