"""Admission: a global cap and a per-tenant cap on running sandboxes, first come first served.

Tasks wait in arrival order. When a slot frees, the earliest waiting task whose tenant is under
its cap is admitted: a tenant at its cap does not hold up the others behind it. Nothing is
dropped: a waiter leaves the queue only when admitted, withdrawn (cancel, timeout) or when the
admission closes (shutdown: its message goes back to the stream).

Pure asyncio, no I/O. Every operation is idempotent per task id.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field


class Withdrawn(Exception):
    """The task left the queue before it was admitted (cancelled or timed out)."""


class AdmissionClosed(Exception):
    """The service is shutting down; the task was not admitted."""


@dataclass
class _Waiter:
    task_id: str
    tenant: str
    future: asyncio.Future[None] = field(repr=False)


class Admission:
    def __init__(self, *, max_concurrent: int, max_per_tenant: int) -> None:
        if max_concurrent < 1 or max_per_tenant < 1:
            raise ValueError("admission caps must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_per_tenant = max_per_tenant
        self._holders: dict[str, str] = {}  # task id → tenant
        self._per_tenant: Counter[str] = Counter()
        self._queue: list[_Waiter] = []  # arrival order
        self._closed = False

    # -- views ---------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def holds(self, task_id: str) -> bool:
        return task_id in self._holders

    def is_waiting(self, task_id: str) -> bool:
        return any(w.task_id == task_id for w in self._queue)

    def queue(self) -> list[str]:
        return [w.task_id for w in self._queue]

    # -- operations ----------------------------------------------------------------------------

    async def acquire(self, task_id: str, tenant: str) -> None:
        """Wait for a slot; return once ``task_id`` holds one (at once if it already does).

        Raises :class:`Withdrawn` if the task is withdrawn while waiting and
        :class:`AdmissionClosed` on shutdown. A second caller for a task that is already
        waiting (a redelivery) waits for the same turn. Cancelling the caller gives the turn up.
        """
        if task_id in self._holders:
            return
        if self._closed:
            raise AdmissionClosed("the lifecycle is shutting down")
        waiter = next((w for w in self._queue if w.task_id == task_id), None)
        if waiter is None:
            loop = asyncio.get_running_loop()
            waiter = _Waiter(task_id, tenant, loop.create_future())
            self._queue.append(waiter)
            self._admit()
        try:
            await asyncio.shield(waiter.future)
        except asyncio.CancelledError:
            # The caller went away (worker stopping): give the turn up unless already admitted,
            # so the slot is not held by a task nobody is handling.
            if waiter in self._queue:
                self._queue.remove(waiter)
                if not waiter.future.done():
                    waiter.future.cancel()
            raise

    def occupy(self, task_id: str, tenant: str) -> None:
        """Take a slot without waiting (re-occupying the slots of live sandboxes at start-up).

        May go over the caps: those sandboxes exist already.
        """
        if task_id in self._holders:
            return
        self._withdraw(task_id, None)
        self._holders[task_id] = tenant
        self._per_tenant[tenant] += 1

    def release(self, task_id: str) -> bool:
        """Free the task's slot (if it holds one) and admit whoever is next."""
        tenant = self._holders.pop(task_id, None)
        if tenant is None:
            return False
        self._per_tenant[tenant] -= 1
        if self._per_tenant[tenant] <= 0:
            del self._per_tenant[tenant]
        self._admit()
        return True

    def withdraw(self, task_id: str) -> bool:
        """Take a waiting task out of the queue; its ``acquire`` raises :class:`Withdrawn`."""
        return self._withdraw(task_id, Withdrawn(f"task {task_id} left the admission queue"))

    def close(self) -> None:
        """Refuse new waiters and wake every waiting one with :class:`AdmissionClosed`."""
        self._closed = True
        for waiter in list(self._queue):
            self._withdraw(waiter.task_id, AdmissionClosed("the lifecycle is shutting down"))

    # -- internals -----------------------------------------------------------------------------

    def _withdraw(self, task_id: str, exc: BaseException | None) -> bool:
        for waiter in self._queue:
            if waiter.task_id == task_id:
                self._queue.remove(waiter)
                if not waiter.future.done():
                    if exc is None:
                        waiter.future.set_result(None)
                    else:
                        waiter.future.set_exception(exc)
                return True
        return False

    def _admit(self) -> None:
        i = 0
        while i < len(self._queue) and len(self._holders) < self.max_concurrent:
            waiter = self._queue[i]
            if self._per_tenant[waiter.tenant] >= self.max_per_tenant:
                i += 1  # this tenant is at its cap: the next tenant's task may go first
                continue
            del self._queue[i]
            self._holders[waiter.task_id] = waiter.tenant
            self._per_tenant[waiter.tenant] += 1
            if not waiter.future.done():
                waiter.future.set_result(None)
