"""Per-tenant limits of the gateway: a submission rate, a cap on tasks not yet ended, and a
cap on open event streams. Each refusal is ``429`` with ``Retry-After`` and publishes nothing.

The rate holds across gateway processes and replicas: each takes a token for every
submission it handles, and one for every new task another one accepted, as its projection
folds that task's request (:meth:`TenantLimits.folded`, a few milliseconds behind). The queued
count comes from the projection too, the same on every replica. Open streams are counted per
process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

from services.gateway.http import ApiError
from shared.settings import Settings

_MAX_TRACKED = 100_000  # tenants with a bucket in memory; the idle ones are dropped first


class TenantLimits:
    def __init__(self, settings: Settings) -> None:
        self.rate = settings.rate_per_tenant
        self.burst = 2 * settings.rate_per_tenant
        self.max_queued = settings.max_queued_per_tenant
        self.max_streams = settings.max_streams_per_tenant
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._streams: dict[str, int] = {}
        self._own: dict[str, None] = {}
        """Tasks this process is publishing: their fold here is no other process's (their
        token was taken by :meth:`submission`). Left at the fold, or when nothing is stored."""

    def submission(self, tenant: str, open_tasks: int) -> None:
        """Take one submission of ``tenant`` who has ``open_tasks`` not yet ended, or raise
        ``429`` (``quota_exceeded`` or ``rate_limited``)."""
        if open_tasks >= self.max_queued:
            raise ApiError(
                429,
                "quota_exceeded",
                f"tenant has {open_tasks} tasks not yet finished (the limit is "
                f"{self.max_queued}); wait for some to end",
                headers={"Retry-After": "5"},
            )
        tokens, now = self._tokens(tenant)
        if tokens < 1:
            self._keep(tenant, tokens, now)
            wait = math.ceil((1 - tokens) / self.rate) if self.rate > 0 else 60
            raise ApiError(
                429,
                "rate_limited",
                f"more than {self.rate:g} submissions per second; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._keep(tenant, tokens - 1, now)

    def publishing(self, task_id: str) -> None:
        """This process is about to publish ``task_id``'s request (its token is taken)."""
        self._own[task_id] = None
        if len(self._own) > _MAX_TRACKED:
            del self._own[next(iter(self._own))]

    def not_stored(self, task_id: str) -> None:
        """The request of :meth:`publishing` added no task (refused, a duplicate, no ack)."""
        self._own.pop(task_id, None)

    def folded(self, tenant: str, task_id: str) -> None:
        """A new task's request, as the projection folds it live: another process's takes
        one of the tenant's tokens here too (down to minus a burst: what all of them
        accepted is paid back at the rate, whichever took it)."""
        if task_id in self._own:
            del self._own[task_id]
            return
        tokens, now = self._tokens(tenant)
        self._keep(tenant, max(-self.burst, tokens - 1), now)

    def _tokens(self, tenant: str) -> tuple[float, float]:
        now = time.monotonic()
        tokens, at = self._buckets.pop(tenant, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate), now

    def _keep(self, tenant: str, tokens: float, now: float) -> None:
        self._buckets[tenant] = (tokens, now)  # re-inserted: the dict keeps recency order
        if len(self._buckets) > _MAX_TRACKED:
            del self._buckets[next(iter(self._buckets))]

    @contextlib.contextmanager
    def stream(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s event streams open, or raise ``429 too_many_streams``."""
        held = self._streams.get(tenant, 0)
        if held >= self.max_streams:
            raise ApiError(
                429,
                "too_many_streams",
                f"{held} event streams are open for this tenant (the limit is "
                f"{self.max_streams}); close one",
                headers={"Retry-After": "1"},
            )
        self._streams[tenant] = held + 1
        try:
            yield
        finally:
            left = self._streams[tenant] - 1
            if left:
                self._streams[tenant] = left
            else:
                del self._streams[tenant]
