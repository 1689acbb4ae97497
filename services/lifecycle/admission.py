"""Admission: a global cap and a per-tenant cap on running sandboxes, shared fairly.

Each tenant has its own queue, in arrival order. When a slot frees, it goes to the tenant
under its cap with the fewest running tasks; among those, to the one served longest ago (a
tenant with nothing running or waiting starts afresh), then to the oldest waiting task. So a
tenant with a thousand queued tasks gets its turn like a tenant with one: it never starves
the others, and nobody waits behind another tenant's backlog. Nothing is dropped: a waiter
leaves its queue only when admitted, withdrawn (cancel, timeout) or when the admission closes
(shutdown: its message goes back to the stream).

Pure asyncio, no I/O. Every operation is idempotent per task id; a grant costs O(tenants).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field


class Withdrawn(Exception):
    """The task left the queue before it was admitted (cancelled or timed out)."""


class AdmissionClosed(Exception):
    """The service is shutting down; the task was not admitted."""


@dataclass
class _Waiter:
    task_id: str
    tenant: str
    arrival: int
    future: asyncio.Future[None] = field(repr=False)


class Admission:
    def __init__(self, *, max_concurrent: int, max_per_tenant: int) -> None:
        if max_concurrent < 1 or max_per_tenant < 1:
            raise ValueError("admission caps must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_per_tenant = max_per_tenant
        self._holders: dict[str, str] = {}  # task id → tenant
        self._per_tenant: Counter[str] = Counter()
        self._queues: dict[str, deque[_Waiter]] = {}  # tenant → its waiters, arrival order
        self._waiters: dict[str, _Waiter] = {}  # task id → waiter
        self._arrivals = itertools.count()
        self._grants = itertools.count()
        self._served: dict[str, int] = {}  # tenant → number of its last grant, while active
        self._closed = False

    # -- views ---------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def holds(self, task_id: str) -> bool:
        return task_id in self._holders

    def is_waiting(self, task_id: str) -> bool:
        return task_id in self._waiters

    def queue(self) -> list[str]:
        """Every waiting task, in arrival order."""
        return [w.task_id for w in sorted(self._waiters.values(), key=lambda w: w.arrival)]

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
        waiter = self._waiters.get(task_id)
        if waiter is None:
            loop = asyncio.get_running_loop()
            waiter = _Waiter(task_id, tenant, next(self._arrivals), loop.create_future())
            self._waiters[task_id] = waiter
            self._queues.setdefault(tenant, deque()).append(waiter)
            self._admit()
        try:
            await asyncio.shield(waiter.future)
        except asyncio.CancelledError:
            # The caller went away (worker stopping): give the turn up unless already admitted,
            # so the slot is not held by a task nobody is handling.
            if self._waiters.get(task_id) is waiter:
                self._unqueue(waiter)
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
        self._forget_if_idle(tenant)
        self._admit()
        return True

    def withdraw(self, task_id: str) -> bool:
        """Take a waiting task out of the queue; its ``acquire`` raises :class:`Withdrawn`."""
        return self._withdraw(task_id, Withdrawn(f"task {task_id} left the admission queue"))

    def close(self) -> None:
        """Refuse new waiters and wake every waiting one with :class:`AdmissionClosed`."""
        self._closed = True
        for task_id in list(self._waiters):
            self._withdraw(task_id, AdmissionClosed("the lifecycle is shutting down"))

    # -- internals -----------------------------------------------------------------------------

    def _withdraw(self, task_id: str, exc: BaseException | None) -> bool:
        waiter = self._waiters.get(task_id)
        if waiter is None:
            return False
        self._unqueue(waiter)
        if not waiter.future.done():
            if exc is None:
                waiter.future.set_result(None)
            else:
                waiter.future.set_exception(exc)
        return True

    def _unqueue(self, waiter: _Waiter) -> None:
        del self._waiters[waiter.task_id]
        queue = self._queues[waiter.tenant]
        queue.remove(waiter)  # O(its tenant's queue): only on withdrawal, never on a grant
        if not queue:
            del self._queues[waiter.tenant]
        self._forget_if_idle(waiter.tenant)

    def _forget_if_idle(self, tenant: str) -> None:
        if tenant not in self._queues and self._per_tenant[tenant] <= 0:
            self._served.pop(tenant, None)

    def _admit(self) -> None:
        while len(self._holders) < self.max_concurrent:
            eligible = [
                (self._per_tenant[tenant], self._served.get(tenant, -1), queue[0].arrival, tenant)
                for tenant, queue in self._queues.items()
                if self._per_tenant[tenant] < self.max_per_tenant
            ]
            if not eligible:
                return
            *_, tenant = min(eligible)
            queue = self._queues[tenant]
            waiter = queue.popleft()
            if not queue:
                del self._queues[tenant]
            del self._waiters[waiter.task_id]
            self._holders[waiter.task_id] = tenant
            self._per_tenant[tenant] += 1
            self._served[tenant] = next(self._grants)
            if not waiter.future.done():
                waiter.future.set_result(None)
