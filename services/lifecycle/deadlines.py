"""Task deadlines: one in-process timer per open task, re-armed at start-up.

Timers are not durable: the lifecycle arms them from ``TaskRequested`` (and from a redelivered
request), and at start-up from each live sandbox's ``sandstream.deadline`` label. When one
fires, ``expire(task)`` runs until it succeeds (with backoff): a failed timeout is retried,
never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from shared.errors import backoff

log = structlog.get_logger("sandstream.lifecycle")


class Deadlines:
    def __init__(self, expire: Callable[[str], Awaitable[None]]) -> None:
        self._expire = expire
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def arm(self, task: str, deadline: float) -> None:
        """Expire ``task`` at ``deadline`` (epoch seconds) unless it is armed already."""
        if task in self._timers or self._closed:
            return
        self._timers[task] = asyncio.create_task(self._run(task, deadline), name=task)

    def disarm(self, task: str) -> None:
        timer = self._timers.pop(task, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    async def close(self) -> None:
        """Cancel every timer (the next lifecycle re-arms them) and arm no more."""
        self._closed = True
        timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)

    async def _run(self, task: str, deadline: float) -> None:
        with structlog.contextvars.bound_contextvars(task_id=task):
            try:
                await asyncio.sleep(max(0.0, deadline - time.time()))
                attempt = 0
                while True:
                    attempt += 1
                    try:
                        await self._expire(task)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.warning("timeout handling failed, retrying", error=repr(exc))
                        await asyncio.sleep(backoff(attempt))
            finally:
                if self._timers.get(task) is asyncio.current_task():
                    del self._timers[task]
