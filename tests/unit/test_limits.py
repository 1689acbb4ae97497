"""A tenant's submission rate, taken by this process's submissions and others' tasks."""

from __future__ import annotations

from services.gateway.http import ApiError
from services.gateway.limits import TenantLimits
from shared.settings import Settings


def slow(burst: float) -> TenantLimits:
    """Limits whose tokens do not come back while a test runs."""
    limits = TenantLimits(Settings(rate_per_tenant=0.001))
    limits.burst = burst
    return limits


def refused(limits: TenantLimits) -> bool:
    try:
        limits.submission("acme", 0)
    except ApiError as exc:
        assert exc.code == "rate_limited"
        return True
    return False


def test_its_own_submissions_count_once_and_others_tasks_count_too() -> None:
    limits = slow(burst=2)
    assert not refused(limits)
    limits.publishing("t_mine")
    limits.folded("acme", "t_mine")  # its own, folded: already paid for
    assert limits._own == {}
    limits.folded("acme", "t_theirs")  # another process's: one token
    assert refused(limits)


def test_what_others_took_is_owed_down_to_one_burst() -> None:
    limits = slow(burst=2)
    for n in range(10):
        limits.folded("acme", f"t_{n}")
    tokens, _ = limits._buckets["acme"]
    assert tokens == -2


def test_a_request_that_stored_nothing_is_forgotten() -> None:
    limits = slow(burst=2)
    limits.publishing("t_refused")
    limits.not_stored("t_refused")
    assert limits._own == {}
