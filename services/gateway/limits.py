"""Per-tenant limits of the gateway: a submission rate, a cap on tasks not yet ended, and a
cap on open event streams. Each refusal is ``429`` with ``Retry-After`` and publishes nothing.

The limits are per gateway process (a replica counts its own submissions and streams); the
queued count comes from the projection, so it is the same on every replica.
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
        now = time.monotonic()
        tokens, at = self._buckets.pop(tenant, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[tenant] = (tokens, now)
            wait = math.ceil((1 - tokens) / self.rate) if self.rate > 0 else 60
            raise ApiError(
                429,
                "rate_limited",
                f"more than {self.rate:g} submissions per second; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._buckets[tenant] = (tokens - 1, now)  # re-inserted: the dict keeps recency order
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
