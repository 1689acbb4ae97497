"""The warm pool: hardened sandboxes made and started before any task asks for one.

A task claims a ready one (:meth:`Sandboxes.claim`: two renames, no container made) and gets
everything that is its own after the claim: its model and egress sockets appear in the folder
the sandbox already has bound in, and the executor fills the workspace and the configuration
as for any sandbox. A claimed sandbox is the task's for good: it is removed with the task,
never handed back. The pool refills in the background; pool sandboxes are never counted as
tasks, and after a crash the next start reaps the unclaimed ones (``Lifecycle.reconcile``)
before making new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from services.lifecycle.sandboxes import Sandboxes
from shared import events as ev
from shared.errors import SandstreamError, Unavailable
from shared.sandbox import SandboxInfo

log = structlog.get_logger("sandstream.lifecycle")

RETRY_S: tuple[float, float] = (1.0, 30.0)
"""The first and the longest wait before making a pool sandbox again after a failure."""


class WarmPool:
    def __init__(self, sandboxes: Sandboxes, size: int) -> None:
        self.sandboxes = sandboxes
        self.size = size
        self.claimed = 0
        self.missed = 0
        """Tasks that found the pool empty (a pool of 0 never counts)."""
        self._ready: deque[str] = deque()
        self._stale: list[str] = []
        """Pool sandboxes whose claim broke off with the engine unreachable: removed once it
        answers again (their folder is already the task's, which makes its own sandbox)."""
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._making: asyncio.Future[str] | None = None
        """The pool sandbox being made: never cut off half-way (the engine may finish a create
        its client gave up on), so a stop waits for it and removes it."""

    @property
    def ready(self) -> int:
        return len(self._ready)

    def start(self) -> None:
        """Start filling (after the engine was reconciled: its unclaimed leftovers are gone)."""
        if self.size > 0 and self._filler is None:
            self._filler = asyncio.create_task(self._fill(), name="warm-pool")

    async def close(self) -> None:
        """Stop filling and remove the unclaimed sandboxes: a stopped lifecycle leaves none."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        if self._making is not None:  # finishing: removed with the rest
            with contextlib.suppress(Exception, asyncio.CancelledError):
                self._ready.append(await self._making)
            self._making = None
        while self._ready:
            with contextlib.suppress(SandstreamError):
                await self.sandboxes.remove(self._ready.popleft())

    async def claim(self, requested: ev.TaskRequested) -> SandboxInfo | None:
        """A ready sandbox made the task's, or ``None`` (the caller creates one): the pool is
        empty, or an earlier try of this task may have made its sandbox already."""
        if self.size == 0 or self.sandboxes.started_before(requested.task_id):
            return None
        while self._ready:
            pool = self._ready.popleft()
            self._wanted.set()
            try:
                info = await self.sandboxes.claim(pool, requested)
            except Unavailable:
                self._stale.append(pool)
                self._wanted.set()
                raise
            if info is not None:
                self.claimed += 1
                return info
        self.missed += 1
        return None

    async def _fill(self) -> None:
        wait = RETRY_S[0]
        while True:
            self._wanted.clear()
            while self._stale:
                try:
                    await self.sandboxes.remove(self._stale[-1])
                    self._stale.pop()
                except SandstreamError as exc:
                    log.warning("warm pool: a stale sandbox stays", error=str(exc), retry_s=wait)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_S[1])
            while len(self._ready) < self.size:
                try:
                    self._making = asyncio.ensure_future(self.sandboxes.make_pooled())
                    made = await asyncio.shield(self._making)
                    self._making = None  # ready: a claim may take it from here on
                    self._ready.append(made)
                    wait = RETRY_S[0]
                except (SandstreamError, OSError) as exc:
                    log.warning("warm pool: no sandbox made", error=str(exc), retry_s=wait)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_S[1])
            await self._wanted.wait()
