"""Admission caps, order, withdrawal and shutdown (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from services.lifecycle.admission import Admission, AdmissionClosed, Withdrawn


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_global_cap_admits_in_order() -> None:
    adm = Admission(max_concurrent=1, max_per_tenant=10)
    await adm.acquire("a", "x")
    order: list[str] = []

    async def want(task: str) -> None:
        await adm.acquire(task, "x")
        order.append(task)

    waiters = [asyncio.create_task(want(t)) for t in ("b", "c", "d")]
    await settle()
    assert adm.queue() == ["b", "c", "d"] and order == []
    for done in ("a", "b", "c"):
        adm.release(done)
        await settle()
    await asyncio.gather(*waiters)
    assert order == ["b", "c", "d"]
    assert adm.running == 1 and adm.holds("d")


async def test_tenant_at_cap_does_not_block_others() -> None:
    adm = Admission(max_concurrent=3, max_per_tenant=1)
    await adm.acquire("x1", "x")
    x2 = asyncio.create_task(adm.acquire("x2", "x"))
    y1 = asyncio.create_task(adm.acquire("y1", "y"))
    await settle()
    assert y1.done() and not x2.done()
    adm.release("x1")
    await asyncio.wait_for(x2, 1)
    assert adm.holds("x2") and adm.holds("y1")


async def test_a_tenants_backlog_does_not_starve_another_tenant() -> None:
    """One slot; tenant x queued ten tasks before tenant y queued one. y runs second, not
    eleventh; then the turns alternate while both have work."""
    adm = Admission(max_concurrent=1, max_per_tenant=10)
    order: list[str] = []

    async def want(task: str, tenant: str) -> None:
        await adm.acquire(task, tenant)
        order.append(task)

    waiters = [asyncio.create_task(want(f"x{i}", "x")) for i in range(10)]
    await settle()
    waiters += [asyncio.create_task(want(f"y{i}", "y")) for i in range(2)]
    await settle()
    for _ in range(5):
        adm.release(order[-1])
        await settle()
    assert order == ["x0", "y0", "x1", "y1", "x2", "x3"]
    assert adm.waiting == 6 and adm.queue() == [f"x{i}" for i in range(4, 10)]
    adm.close()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_fewest_running_goes_first() -> None:
    adm = Admission(max_concurrent=3, max_per_tenant=3)
    for task in ("x1", "x2", "y1"):
        await adm.acquire(task, task[0])
    x3 = asyncio.create_task(adm.acquire("x3", "x"))
    y2 = asyncio.create_task(adm.acquire("y2", "y"))
    await settle()
    adm.release("x1")  # x now runs 1, y runs 1: y was served last, so x goes first
    await settle()
    assert x3.done() and not y2.done()
    adm.release("x2")  # x runs 1 (x3), y runs 1: y's turn
    await asyncio.wait_for(y2, 1)


async def test_acquire_is_idempotent_and_redelivery_shares_the_turn() -> None:
    adm = Admission(max_concurrent=1, max_per_tenant=1)
    await adm.acquire("a", "x")
    await adm.acquire("a", "x")  # holds already: immediate
    first = asyncio.create_task(adm.acquire("b", "x"))
    second = asyncio.create_task(adm.acquire("b", "x"))
    await settle()
    assert adm.queue() == ["b"]
    adm.release("a")
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert adm.running == 1
    assert not adm.release("nobody")


async def test_withdraw_and_close() -> None:
    adm = Admission(max_concurrent=1, max_per_tenant=1)
    await adm.acquire("a", "x")
    b = asyncio.create_task(adm.acquire("b", "x"))
    c = asyncio.create_task(adm.acquire("c", "x"))
    await settle()
    assert adm.withdraw("b")
    with pytest.raises(Withdrawn):
        await b
    adm.close()
    with pytest.raises(AdmissionClosed):
        await c
    with pytest.raises(AdmissionClosed):
        await adm.acquire("d", "x")
    assert adm.waiting == 0


async def test_cancelled_waiter_gives_up_its_turn() -> None:
    adm = Admission(max_concurrent=1, max_per_tenant=1)
    await adm.acquire("a", "x")
    b = asyncio.create_task(adm.acquire("b", "x"))
    await settle()
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    adm.release("a")
    assert adm.running == 0 and adm.waiting == 0


async def test_occupy_may_exceed_caps() -> None:
    adm = Admission(max_concurrent=1, max_per_tenant=1)
    adm.occupy("a", "x")
    adm.occupy("b", "x")
    assert adm.running == 2
    c = asyncio.create_task(adm.acquire("c", "y"))
    adm.release("a")
    await settle()
    assert not c.done()  # still at the global cap (b)
    adm.release("b")
    await asyncio.wait_for(c, 1)
