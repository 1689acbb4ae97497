"""The lifecycle's engine-independent tests again, against the in-memory sandbox driver (its
contract with Docker: test_sandbox_contract.py), so `make fast` covers admission, deadlines,
cancellation and endings. The tests themselves live in test_lifecycle.py, run there on Docker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared import events as ev
from shared.bus import Bus
from shared.errors import Unavailable
from shared.sandbox import LABEL_TASK
from tests.integration import test_lifecycle as on_docker
from tests.integration.test_lifecycle import Harness
from tests.support.memory_driver import MemoryDriver
from tests.support.sandboxes import wait_for_event


@pytest.fixture
async def h(bus: Bus, tmp_path: Path) -> AsyncIterator[Harness]:
    driver = MemoryDriver(missing_images=["sandstream/no-such-image:missing"])
    harness = Harness(bus, driver, "mem", tmp_path)
    try:
        yield harness
    finally:
        for service in harness.services:
            await service.stop(timeout=5)


test_requested_task_gets_a_hardened_running_sandbox = (
    on_docker.test_requested_task_gets_a_hardened_running_sandbox
)
test_per_tenant_cap_lets_other_tenants_pass = on_docker.test_per_tenant_cap_lets_other_tenants_pass
test_a_tenants_backlog_holds_no_slot_another_tenant_needs = (
    on_docker.test_a_tenants_backlog_holds_no_slot_another_tenant_needs
)
test_deadline_times_the_task_out_and_removes_the_sandbox = (
    on_docker.test_deadline_times_the_task_out_and_removes_the_sandbox
)
test_a_task_whose_last_events_are_output_still_times_out = (
    on_docker.test_a_task_whose_last_events_are_output_still_times_out
)
test_deadline_also_applies_while_queued = on_docker.test_deadline_also_applies_while_queued
test_cancel_while_queued_and_while_running = on_docker.test_cancel_while_queued_and_while_running
test_result_stored_ends_the_task_and_late_events_are_ignored = (
    on_docker.test_result_stored_ends_the_task_and_late_events_are_ignored
)
test_storage_giving_up_ends_the_task_failed = on_docker.test_storage_giving_up_ends_the_task_failed
test_missing_image_fails_the_task = on_docker.test_missing_image_fails_the_task
test_start_up_reaps_orphans_and_keeps_live_sandboxes = (
    on_docker.test_start_up_reaps_orphans_and_keeps_live_sandboxes
)
test_a_graceful_restart_loses_no_waiting_task = (
    on_docker.test_a_graceful_restart_loses_no_waiting_task
)
test_a_task_waiting_through_more_restarts_than_max_deliver_still_runs = (
    on_docker.test_a_task_waiting_through_more_restarts_than_max_deliver_still_runs
)
test_a_task_claims_a_warm_sandbox_and_the_pool_refills = (
    on_docker.test_a_task_claims_a_warm_sandbox_and_the_pool_refills
)
test_unclaimed_pool_sandboxes_of_a_crashed_lifecycle_are_reaped = (
    on_docker.test_unclaimed_pool_sandboxes_of_a_crashed_lifecycle_are_reaped
)
test_an_empty_pool_or_a_retried_start_makes_a_sandbox_as_before = (
    on_docker.test_an_empty_pool_or_a_retried_start_makes_a_sandbox_as_before
)


async def test_a_claim_cut_off_by_the_engine_leaves_no_pool_sandbox_behind(h: Harness) -> None:
    """The engine stops answering between the claim's two renames: the task is retried and
    gets a sandbox of its own; the half-claimed pool sandbox is removed once the engine is back."""
    assert isinstance(h.driver, MemoryDriver)
    driver = h.driver
    rename = driver.rename
    refused: list[str] = []

    async def unreachable_once(name: str, new_name: str) -> None:
        if not refused:
            refused.append(name)
            raise Unavailable("the container engine (Docker) cannot be reached: test")
        await rename(name, new_name)

    driver.rename = unreachable_once  # type: ignore[method-assign]
    service = h.lifecycle(warm_pool=1)
    await service.start()
    await h.pool_ready(service, 1)
    task = ev.new_task_id()
    await h.request(task)
    await wait_for_event(h.bus, task, "SandboxStarted")
    assert refused and service.pool.claimed == 0
    data = await h.container(task)
    assert data is not None and data["Config"]["Labels"][LABEL_TASK] == task  # its own
    async with asyncio.timeout(10):  # the stale one goes, the pool is whole again
        while refused[0] in driver.containers or service.pool.ready < 1:
            await asyncio.sleep(0.02)
