"""Errors shared by every service.

``Unavailable`` means a dependency (NATS, storage, Docker) cannot be reached right now: the
work is retried later and HTTP callers get ``503``. ``Conflict`` means an optimistic-concurrency
check failed: someone else changed the task first. ``Permanent`` means retrying cannot help.
"""

from __future__ import annotations


class SandstreamError(Exception):
    """Base of the project's own errors."""


class Unavailable(SandstreamError):
    """A dependency cannot be reached now; retrying later may succeed."""


class Conflict(SandstreamError):
    """The task's history moved on since it was read (expected sequence mismatch)."""


class Permanent(SandstreamError):
    """The message or request can never succeed: stop retrying it."""

    def __init__(self, message: str, *, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class Retry(SandstreamError):
    """Ask for redelivery, optionally after ``delay`` seconds."""

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def backoff(attempt: int, *, first: float = 0.5, cap: float = 15.0) -> float:
    """The pause after the ``attempt``-th failure (1-based): ``first``, doubling, at most ``cap``.

    The one backoff of the code base: redeliveries, the lifecycle's deadline retries, ``up``'s
    restarts of a dead service.
    """
    return float(min(cap, first * 2 ** max(0, attempt - 1)))
