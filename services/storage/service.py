"""The storage service: on ``SandboxStopped``, store the task's result and emit ``ResultStored``.

For each ``<prefix>.<task>.SandboxStopped`` (durable consumer ``storage``):

1. read the task's whole history (ordered reader on ``<prefix>.<task>.>``);
2. if a ``ResultStored`` is already there, stop: a redelivery emits nothing new;
3. write ``tasks/<task>/transcript.jsonl``, ``diff.patch`` and ``result.json`` (deterministic
   keys and bytes, so doing it twice changes nothing);
4. only when all three are durable, publish ``ResultStored`` (id ``<task>:ResultStored:1``).

A store that is down or refuses writes raises :class:`~shared.errors.Unavailable`: the message
is not acknowledged and comes back with a growing delay, so the task waits until the store
works again. After ``max_deliver`` failed deliveries it publishes ``StorageFailed`` with the
reason, and the lifecycle ends the task ``failed``; nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.storage.build import Artifacts, build
from shared import events as ev
from shared.blobstore import BlobStore
from shared.bus import Bus
from shared.errors import backoff
from shared.results import CONTENT_TYPES, DIFF_FILE, RESULT_FILE, TRANSCRIPT_FILE, task_prefix
from shared.state import fold
from shared.worker import Delivery, Worker

log = structlog.get_logger("sandstream.storage")

DURABLE = "storage"


def storage_backoff(num_delivered: int) -> float:
    """0.5 s, 1 s, 2 s, … capped at 30 s: a store outage is waited out, not hammered."""
    return backoff(num_delivered, cap=30.0)


class StorageService:
    """Stores results; its dependencies (bus, store) arrive as keyword arguments."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: BlobStore,
        durable: str = DURABLE,
        concurrency: int = 8,
        ack_wait: float = 10.0,
        max_deliver: int = 40,
        backoff: Callable[[int], float] = storage_backoff,
    ) -> None:
        self.bus = bus
        self.store = store
        self.worker = Worker(
            bus=bus,
            durable=durable,
            subjects=[f"{bus.prefix}.*.{ev.type_name(ev.SandboxStopped)}"],
            handler=self.handle,
            on_give_up=self.give_up,
            concurrency=concurrency,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            backoff=backoff,
        )

    async def run(self) -> None:
        """Handle messages until :meth:`stop`."""
        await self.worker.run()

    async def run_until_idle(self, idle_timeout: float = 0.3) -> None:
        await self.worker.run_until_idle(idle_timeout)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop fetching; in-flight results get ``grace`` seconds to finish."""
        await self.worker.stop(grace)

    async def handle(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        """Worker handler; raises :class:`Unavailable` (→ retry later) if the store fails."""
        if not isinstance(event, ev.SandboxStopped):
            log.warning("unexpected event ignored", type=ev.type_name(type(event)))
            return
        await self.store_result(event)

    async def store_result(self, stopped: ev.SandboxStopped) -> ev.ResultStored | None:
        """Store the result of the task ``stopped`` ends; ``None`` if it was stored before."""
        began = time.perf_counter()
        # The whole history, output included, read to its last stored event: never a result
        # built from part of it.
        history = await self.bus.history(stopped.task_id)
        state = fold(history)
        if state is not None and state.result_location is not None:
            log.info("result already stored", task_id=stopped.task_id)
            return None
        artifacts = build(history, stopped)
        objects = await self._write(stopped.task_id, artifacts)
        # What the executor stored itself (the branch's bundle) is the task's too.
        objects += [o for e in history for o in _stored_by_the_executor(e)]
        stored = ev.ResultStored(
            event_id=ev.event_id(stopped.task_id, ev.type_name(ev.ResultStored)),
            task_id=stopped.task_id,
            tenant=stopped.tenant,
            causation_id=stopped.event_id,
            status=artifacts.result.status,
            error=artifacts.result.error,
            location=self.store.url_for(task_prefix(stopped.task_id)),
            objects=objects,
        )
        await self.bus.publish(stored)
        log.info(
            "result stored",
            status=stored.status,
            location=stored.location,
            bytes=sum(o.size for o in objects),
            ms=round((time.perf_counter() - began) * 1000, 1),
        )
        return stored

    async def _write(self, task_id: str, artifacts: Artifacts) -> list[ev.StoredObject]:
        """Write the three objects concurrently; return only once every one is durable."""
        prefix = task_prefix(task_id)
        contents = (
            (RESULT_FILE, artifacts.result_json),
            (TRANSCRIPT_FILE, artifacts.transcript),
            (DIFF_FILE, artifacts.diff),
        )
        outcomes = await asyncio.gather(
            *(self.store.put(prefix + name, data, CONTENT_TYPES[name]) for name, data in contents),
            return_exceptions=True,
        )
        objects: list[ev.StoredObject] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the first failure; no event is published
            objects.append(outcome)
        return objects

    async def give_up(self, event: ev.AnyEvent, reason: str) -> None:
        """After the last delivery: say so with ``StorageFailed``; the lifecycle ends the task."""
        failed = ev.StorageFailed(
            event_id=ev.event_id(event.task_id, "StorageFailed"),
            task_id=event.task_id,
            tenant=event.tenant,
            causation_id=event.event_id,
            error=ev.ErrorInfo(
                code="storage_failed", message=f"the result could not be stored: {reason}"
            ),
        )
        await self.bus.publish(failed)


def _stored_by_the_executor(event: ev.AnyEvent) -> list[ev.StoredObject]:
    """The objects an execution's end names (bundle, artifacts, the kept workspace and
    session), if in its task's folder."""
    if not isinstance(event, ev.ExecutionCompleted | ev.ExecutionFailed):
        return []
    named = [
        event.branch.bundle if event.branch else None,
        event.artifacts.object if event.artifacts else None,
        *event.kept,
    ]
    prefix = task_prefix(event.task_id)
    return [o for o in named if o is not None and o.key.startswith(prefix)]
