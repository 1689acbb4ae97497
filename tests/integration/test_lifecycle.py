"""The lifecycle service against a real nats-server and the real Docker engine."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lifecycle.service import LABEL_INSTANCE, LABEL_STREAM, Lifecycle, LifecycleOptions
from shared import events as ev
from shared import launch
from shared.bus import Bus
from shared.sandbox import (
    LABEL_DEADLINE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TASK,
    LABEL_TENANT,
    MODEL_PORT,
    SANDBOX_UID,
    SOCKET_NAME,
    DockerDriver,
    SandboxDriver,
    SandboxInfo,
    SandboxSpec,
    is_unclaimed,
    sandbox_name,
)
from shared.settings import Settings
from tests.support.sandboxes import (
    TEST_LABEL,
    count_container_events,
    docker_driver,
    sandbox_image,
    types_of,
    wait_for_event,
)

pytestmark = pytest.mark.docker


class Harness:
    """One test's bus, driver, label and lifecycle(s); every container removed at the end."""

    def __init__(self, bus: Bus, driver: SandboxDriver, tag: str, tmp: Path) -> None:
        self.bus = bus
        self.driver = driver
        self.tag = tag
        self.tmp = tmp
        self.services: list[Lifecycle] = []

    def lifecycle(
        self, *, admit_concurrency: int | None = None, warm_pool: int = 0, **settings: Any
    ) -> Lifecycle:
        base: dict[str, Any] = {
            "stream": self.bus.stream.name,
            "subject_prefix": self.bus.prefix,
            "sandbox_image": sandbox_image(),
            "socket_dir": self.tmp / "model",
            "ack_wait_s": 2.0,
            "max_deliver": 3,
        }
        base.update(settings)
        service = Lifecycle(
            bus=self.bus,
            driver=self.driver,
            settings=Settings(**base),
            options=LifecycleOptions(
                labels={TEST_LABEL: self.tag},
                memory_bytes=256 << 20,
                pids_limit=128,
                admit_concurrency=admit_concurrency,
                warm_pool=warm_pool,
            ),
        )
        self.services.append(service)
        return service

    async def request(self, task: str, *, tenant: str = "acme", timeout_s: int = 600) -> None:
        await self.bus.publish(
            ev.TaskRequested(
                event_id=ev.event_id(task, "TaskRequested"),
                task_id=task,
                tenant=tenant,
                spec=ev.TaskSpec(prompt="hi", timeout_s=timeout_s),
            ),
            expected_last_subject_seq=0,
        )

    async def completed(self, task: str, tenant: str = "acme") -> None:
        await self.bus.publish(
            ev.ExecutionCompleted(
                event_id=ev.event_id(task, "ExecutionEnded"),
                task_id=task,
                tenant=tenant,
                text="done",
                is_error=False,
                exit_code=0,
            )
        )

    async def cancel(self, task: str, tenant: str = "acme") -> None:
        await self.bus.publish(
            ev.TaskCancelRequested(
                event_id=ev.event_id(task, "TaskCancelRequested"), task_id=task, tenant=tenant
            )
        )

    async def stored(
        self,
        task: str,
        status: ev.ResultStatus,
        tenant: str = "acme",
        error: ev.ErrorInfo | None = None,
    ) -> None:
        await self.bus.publish(
            ev.ResultStored(
                event_id=ev.event_id(task, "ResultStored"),
                task_id=task,
                tenant=tenant,
                status=status,
                error=error,
                location=f"file:///r/{task}",
                objects=[],
            )
        )

    async def container(self, task: str) -> dict[str, Any] | None:
        return await self.driver.inspect(sandbox_name(task))

    async def pooled(self) -> list[SandboxInfo]:
        """This test's warm-pool sandboxes, claimed ones included."""
        return await self.driver.list([f"{TEST_LABEL}={self.tag}", LABEL_POOL])

    async def pool_ready(self, service: Lifecycle, size: int, within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while service.pool.ready < size:
                await asyncio.sleep(0.02)

    async def gone(self, task: str, within: float = 10.0) -> bool:
        """Whether the task's container is removed within ``within`` seconds.

        ``SandboxStopped`` is published just before the removal (so a lifecycle killed in
        between still has the container, and its usage, on the retry).
        """
        async with asyncio.timeout(within):
            while await self.container(task) is not None:
                await asyncio.sleep(0.02)
        return True


@pytest.fixture
async def h(bus: Bus, tmp_path: Path) -> AsyncIterator[Harness]:
    async with docker_driver() as (driver, tag):
        harness = Harness(bus, driver, tag, tmp_path)
        try:
            yield harness
        finally:
            for service in harness.services:
                await service.stop(timeout=5)


def task_id(name: str) -> str:
    """A fresh task id; ``name`` only tells the reader which task is which."""
    return ev.new_task_id()


async def test_requested_task_gets_a_hardened_running_sandbox(h: Harness) -> None:
    service = h.lifecycle(instance=f"up-{h.tag}")
    await service.start()
    task = task_id("a")
    await h.request(task)
    started = await wait_for_event(h.bus, task, "SandboxStarted")
    requested = await wait_for_event(h.bus, task, "TaskRequested")
    latency_ms = (started.at - requested.at).total_seconds() * 1000
    print(f"\nTaskRequested -> SandboxStarted: {latency_ms:.0f} ms")
    assert isinstance(started, ev.SandboxStarted)
    assert started.event_id == f"{task}:SandboxStarted:1"
    assert started.causation_id == f"{task}:TaskRequested:1"
    assert started.sandbox == sandbox_name(task) and started.image == sandbox_image()

    data = await h.container(task)
    assert data is not None and data["State"]["Running"]
    labels = data["Config"]["Labels"]
    assert labels[LABEL_TASK] == task and labels[LABEL_TENANT] == "acme"
    assert labels[LABEL_MANAGED] == "1" and labels[LABEL_STREAM] == h.bus.stream.name
    assert labels[LABEL_INSTANCE] == f"up-{h.tag}"
    deadline = requested.at.timestamp() + 600
    assert float(labels[LABEL_DEADLINE]) == pytest.approx(deadline, abs=0.01)
    socket_dir = h.tmp / "model" / task
    # Only the sandbox's user (and root) may reach the model socket's folder.
    assert socket_dir.is_dir() and (socket_dir.stat().st_mode & 0o777) == 0o700
    assert socket_dir.stat().st_uid == SANDBOX_UID
    assert f"{socket_dir}:/run/sandstream:ro" in data["HostConfig"]["Binds"]
    assert data["HostConfig"]["NetworkMode"] == "none"
    assert data["HostConfig"]["CapDrop"] == ["ALL"]


async def test_duplicate_deliveries_make_one_container(h: Harness) -> None:
    since = time.time() - 1
    service = h.lifecycle()
    task = task_id("dup")
    await h.request(task)
    # The same request stored three more times (as a redelivery or a replay would bring it).
    for n in range(3):
        await h.bus.publish(
            ev.TaskRequested(
                event_id=ev.event_id(task, "TaskRequested"),
                task_id=task,
                tenant="acme",
                spec=ev.TaskSpec(prompt="hi"),
            ),
            msg_id=f"{task}:again:{n}",
        )
    await service.run_until_idle()
    assert await types_of(h.bus, task) == ["TaskRequested"] * 4 + ["SandboxStarted"]
    assert len(await h.driver.list(f"{TEST_LABEL}={h.tag}")) == 1
    # A restarted lifecycle handling it again still adopts the same container.
    await service.stop()
    again = h.lifecycle(consumer_prefix="second-")
    await again.run_until_idle()
    assert count_container_events(h.tag, "create", since) == 1
    assert (await types_of(h.bus, task)).count("SandboxStarted") == 1


async def test_global_cap_holds_the_second_task_until_the_first_ends(h: Harness) -> None:
    service = h.lifecycle(max_concurrent=1)
    first, second = task_id("one"), task_id("two")
    await h.request(first)
    await h.request(second)
    await service.run_until_idle()
    assert "SandboxStarted" in await types_of(h.bus, first)
    assert await types_of(h.bus, second) == ["TaskRequested"]
    assert await h.container(second) is None
    assert service.admission.queue() == [second]

    # The executor's work, simulated: burn a little CPU in the sandbox, then report the end.
    await h.driver.exec(sandbox_name(first), ["bash", "-c", "head -c 20000000 /dev/zero | md5sum"])
    await h.completed(first)
    stopped = await wait_for_event(h.bus, first, "SandboxStopped")
    assert isinstance(stopped, ev.SandboxStopped)
    assert stopped.reason == "completed" and stopped.event_id == f"{first}:SandboxStopped:1"
    assert stopped.usage.cpu_seconds > 0 and stopped.usage.memory_peak_bytes > 0
    assert stopped.usage.wall_ms > 0 and stopped.usage.image == sandbox_image()
    assert await h.gone(first)
    await wait_for_event(h.bus, second, "SandboxStarted")
    assert await h.container(second) is not None


async def test_per_tenant_cap_lets_other_tenants_pass(h: Harness) -> None:
    service = h.lifecycle(max_concurrent=4, max_per_tenant=1)
    x1, x2, y1 = task_id("x1"), task_id("x2"), task_id("y1")
    await h.request(x1, tenant="x")
    await h.request(x2, tenant="x")
    await h.request(y1, tenant="y")
    await service.run_until_idle()
    assert "SandboxStarted" in await types_of(h.bus, x1)
    assert "SandboxStarted" in await types_of(h.bus, y1)
    assert await types_of(h.bus, x2) == ["TaskRequested"]
    await h.completed(x1, tenant="x")
    await wait_for_event(h.bus, x2, "SandboxStarted")


async def test_a_tenants_backlog_holds_no_slot_another_tenant_needs(h: Harness) -> None:
    """Tenant x queues more tasks than the lifecycle has handlers for requests; tenant y's
    one task, sent after them all, still starts at once in the slot x may not use."""
    service = h.lifecycle(admit_concurrency=3, max_concurrent=2, max_per_tenant=1)
    await service.start()
    backlog = [task_id(f"x{i}") for i in range(8)]
    for task in backlog:
        await h.request(task, tenant="x")
    await wait_for_event(h.bus, backlog[0], "SandboxStarted")
    late = task_id("y")
    await h.request(late, tenant="y")
    await wait_for_event(h.bus, late, "SandboxStarted")
    started = [t for t in backlog if "SandboxStarted" in await types_of(h.bus, t)]
    assert started == backlog[:1]  # x stays at its cap of one
    assert service.admission.queue() == backlog[1:]  # every x task seen, none lost


async def test_deadline_times_the_task_out_and_removes_the_sandbox(h: Harness) -> None:
    service = h.lifecycle()
    await service.start()
    task = task_id("slow")
    await h.request(task, timeout_s=1)
    await wait_for_event(h.bus, task, "SandboxStarted")
    stopped = await wait_for_event(h.bus, task, "SandboxStopped", timeout=15)
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "timeout"
    assert await types_of(h.bus, task) == [
        "TaskRequested",
        "SandboxStarted",
        "TaskTimedOut",
        "SandboxStopped",
    ]
    ended = await wait_for_event(h.bus, task, "TaskTimedOut")
    assert ended.event_id == f"{task}:terminal" and isinstance(ended, ev.TaskTimedOut)
    assert ended.timeout_s == 1
    assert await h.gone(task)
    assert service.admission.running == 0


async def test_a_task_whose_last_events_are_output_still_times_out(h: Harness) -> None:
    """The lifecycle reads a task's history without its output batches; when those are the
    task's last events (a running agent), the read is still known complete."""
    service = h.lifecycle()
    await service.start()
    task = task_id("talky")
    await h.request(task, timeout_s=2)
    await wait_for_event(h.bus, task, "SandboxStarted")
    await h.bus.publish(
        ev.ExecutionStarted(
            event_id=ev.event_id(task, "ExecutionStarted", 1),
            task_id=task,
            tenant="acme",
            sandbox=sandbox_name(task),
        )
    )
    for batch in range(200):
        await h.bus.publish(
            ev.AgentOutput(
                event_id=ev.event_id(task, "AgentOutput", batch * 10),
                task_id=task,
                tenant="acme",
                batch=batch,
                lines=["{}"] * 10,
            )
        )
    history = await h.bus.history(task, types=ev.WITHOUT_OUTPUT)
    assert [ev.type_name(type(e)) for e in history] == [
        "TaskRequested",
        "SandboxStarted",
        "ExecutionStarted",
    ]
    stopped = await wait_for_event(h.bus, task, "SandboxStopped", timeout=15)
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "timeout"
    assert await h.gone(task)


async def test_deadline_also_applies_while_queued(h: Harness) -> None:
    service = h.lifecycle(max_concurrent=1)
    await service.start()
    running, queued = task_id("run"), task_id("late")
    await h.request(running)
    await h.request(queued, timeout_s=1)
    stopped = await wait_for_event(h.bus, queued, "SandboxStopped", timeout=15)
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "timeout"
    assert await types_of(h.bus, queued) == ["TaskRequested", "TaskTimedOut", "SandboxStopped"]
    await service.run_until_idle()
    assert service.admission.queue() == [] and service.admission.holds(running)
    assert await h.container(queued) is None


async def test_cancel_while_queued_and_while_running(h: Harness) -> None:
    service = h.lifecycle(max_concurrent=1)
    running, queued = task_id("run"), task_id("queue")
    await h.request(running)
    await h.request(queued)
    await service.run_until_idle()
    assert service.admission.queue() == [queued]

    await h.cancel(queued)
    await service.run_until_idle()
    assert await types_of(h.bus, queued) == [
        "TaskRequested",
        "TaskCancelRequested",
        "TaskCancelled",
        "SandboxStopped",
    ]
    stopped = await wait_for_event(h.bus, queued, "SandboxStopped")
    assert isinstance(stopped, ev.SandboxStopped)
    assert stopped.reason == "cancelled" and stopped.usage.cpu_seconds == 0
    assert service.admission.queue() == []

    await h.cancel(running)
    await service.run_until_idle()
    assert await types_of(h.bus, running) == [
        "TaskRequested",
        "SandboxStarted",
        "TaskCancelRequested",
        "TaskCancelled",
        "SandboxStopped",
    ]
    cancelled = await wait_for_event(h.bus, running, "TaskCancelled")
    assert cancelled.event_id == f"{running}:terminal"
    assert await h.container(running) is None
    assert service.admission.running == 0
    # Neither got (or gets) another sandbox.
    assert await h.container(queued) is None
    assert (await types_of(h.bus, queued)).count("SandboxStarted") == 0


async def test_result_stored_ends_the_task_and_late_events_are_ignored(h: Harness) -> None:
    service = h.lifecycle()
    ok, bad = task_id("ok"), task_id("bad")
    await h.request(ok)
    await h.request(bad)
    await service.run_until_idle()
    await h.completed(ok)
    await h.bus.publish(
        ev.ExecutionFailed(
            event_id=ev.event_id(bad, "ExecutionEnded"),
            task_id=bad,
            tenant="acme",
            code="cli_error",
            message="the CLI said is_error",
        )
    )
    await service.run_until_idle()
    stopped = await wait_for_event(h.bus, bad, "SandboxStopped")
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "failed"
    await h.stored(ok, "succeeded")
    # The error as storage decided it (shared/outcome.py); the lifecycle copies it.
    decided = ev.ErrorInfo(code="cli_error", message="decided by storage, not the lifecycle")
    await h.stored(bad, "failed", error=decided)
    await service.run_until_idle()
    done = await wait_for_event(h.bus, ok, "TaskSucceeded")
    assert done.event_id == f"{ok}:terminal"
    failed = await wait_for_event(h.bus, bad, "TaskFailed")
    assert isinstance(failed, ev.TaskFailed) and failed.error == decided

    # Late events for an ended task change nothing.
    await h.cancel(ok)
    await h.bus.publish(
        ev.ExecutionCompleted(
            event_id=ev.event_id(ok, "ExecutionEnded", 2),
            task_id=ok,
            tenant="acme",
            text="",
            is_error=False,
            exit_code=0,
        )
    )
    await service.run_until_idle()
    assert await types_of(h.bus, ok) == [
        "TaskRequested",
        "SandboxStarted",
        "ExecutionCompleted",
        "SandboxStopped",
        "ResultStored",
        "TaskSucceeded",
        "TaskCancelRequested",
        "ExecutionCompleted",
    ]
    assert await h.driver.list(f"{TEST_LABEL}={h.tag}") == []


async def test_storage_giving_up_ends_the_task_failed(h: Harness) -> None:
    service = h.lifecycle()
    await service.start()
    task = task_id("unstorable")
    await h.request(task)
    await wait_for_event(h.bus, task, "SandboxStarted")
    await h.completed(task)
    await wait_for_event(h.bus, task, "SandboxStopped")
    error = ev.ErrorInfo(code="storage_failed", message="the result could not be stored: x")
    await h.bus.publish(
        ev.StorageFailed(
            event_id=ev.event_id(task, "StorageFailed"), task_id=task, tenant="acme", error=error
        )
    )
    ended = await wait_for_event(h.bus, task, "TaskFailed")
    assert isinstance(ended, ev.TaskFailed) and ended.error == error
    assert ended.event_id == ev.terminal_id(task)
    assert ended.causation_id == ev.event_id(task, "StorageFailed")


async def test_missing_image_fails_the_task(h: Harness) -> None:
    service = h.lifecycle(sandbox_image="sandstream/no-such-image:missing")
    task = task_id("noimg")
    await h.request(task)
    await service.run_until_idle()
    failed = await wait_for_event(h.bus, task, "TaskFailed")
    assert isinstance(failed, ev.TaskFailed) and failed.error.code == "image_missing"
    assert await types_of(h.bus, task) == ["TaskRequested", "TaskFailed", "SandboxStopped"]
    assert service.admission.running == 0


class BrokenDriver(DockerDriver):
    async def create(self, spec: SandboxSpec) -> Any:
        raise RuntimeError("the engine is having a bad day")


async def test_poison_request_ends_with_task_failed(h: Harness) -> None:
    service = h.lifecycle(max_deliver=2)
    assert isinstance(h.driver, DockerDriver)
    service.sandboxes.driver = BrokenDriver(h.driver.docker)
    await service.start()
    task = task_id("poison")
    await h.request(task)
    failed = await wait_for_event(h.bus, task, "TaskFailed", timeout=20)
    assert isinstance(failed, ev.TaskFailed) and failed.event_id == f"{task}:terminal"
    assert failed.error.code == "internal" and "bad day" in failed.error.message
    stopped = await wait_for_event(h.bus, task, "SandboxStopped")
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "failed"
    await service.run_until_idle()
    assert service.admission.running == 0


async def test_start_up_reaps_orphans_and_keeps_live_sandboxes(h: Harness) -> None:
    live, ended = task_id("live"), task_id("ended")
    unknown = task_id("unknown")
    first = h.lifecycle()
    await h.request(live)
    await h.request(ended)
    await first.run_until_idle()
    await first.stop()
    # While no lifecycle runs: one task is cancelled, and a stray container appears.
    await h.bus.publish(
        ev.TaskCancelled(event_id=ev.terminal_id(ended), task_id=ended, tenant="acme")
    )
    stray = SandboxSpec(
        task_id=unknown,
        tenant="acme",
        image=sandbox_image(),
        deadline=time.time() + 60,
        labels={TEST_LABEL: h.tag, LABEL_STREAM: h.bus.stream.name},
    )
    await h.driver.create(stray)
    await h.driver.start(stray.name)
    # Someone else's sandbox (another stream) must survive our reaper.
    other = SandboxSpec(
        task_id=task_id("other"),
        tenant="acme",
        image=sandbox_image(),
        deadline=time.time() + 60,
        labels={TEST_LABEL: h.tag, LABEL_STREAM: "someone-else"},
    )
    await h.driver.create(other)

    second = h.lifecycle()
    await second.start()
    assert await h.container(unknown) is None
    assert await h.container(ended) is None
    assert await h.container(live) is not None
    assert await h.driver.inspect(other.name) is not None
    assert second.admission.holds(live) and second.admission.running == 1
    stopped = await wait_for_event(h.bus, ended, "SandboxStopped")
    assert isinstance(stopped, ev.SandboxStopped) and stopped.reason == "cancelled"
    await second.run_until_idle()
    assert (await types_of(h.bus, live)).count("SandboxStarted") == 1


async def test_a_graceful_restart_loses_no_waiting_task(h: Harness) -> None:
    """A stop and a start; SIGKILLed lifecycles are the chaos run's (tests/chaos)."""
    first = h.lifecycle(max_concurrent=1)
    running, waiting = task_id("run"), task_id("wait")
    await h.request(running)
    await h.request(waiting)
    await first.run_until_idle()
    assert first.admission.queue() == [waiting]
    await first.stop()  # the waiting request goes back to the stream

    second = h.lifecycle(max_concurrent=1)  # same durable consumers
    await second.start()
    assert second.admission.holds(running)  # re-occupied from the live sandbox
    await second.run_until_idle()
    assert second.admission.queue() == [waiting]
    await h.completed(running)
    await wait_for_event(h.bus, waiting, "SandboxStarted")
    assert (await types_of(h.bus, running)).count("SandboxStarted") == 1


async def test_a_task_waiting_through_more_restarts_than_max_deliver_still_runs(
    h: Harness,
) -> None:
    """Every stop hands a waiting request back (a delivery); waiting is no failure, so the
    task is never given up for it. Its deadline bounds it."""
    running, waiting = task_id("run"), task_id("wait")
    await h.request(running)
    await h.request(waiting)
    for _ in range(4):  # max_deliver is 3 here
        service = h.lifecycle(max_concurrent=1)
        await service.start()
        async with asyncio.timeout(30):  # handed back with a delay: it comes again
            while service.admission.queue() != [waiting]:
                await asyncio.sleep(0.02)
        await service.stop()
    last = h.lifecycle(max_concurrent=1)
    await last.run_until_idle()
    await h.completed(running)
    await wait_for_event(h.bus, waiting, "SandboxStarted")
    assert "TaskFailed" not in await types_of(h.bus, waiting)


async def test_request_handled_after_its_deadline_times_out_at_once(h: Harness) -> None:
    task = task_id("stale")
    await h.bus.publish(
        ev.TaskRequested(
            event_id=ev.event_id(task, "TaskRequested"),
            task_id=task,
            tenant="acme",
            at=ev.now() - timedelta(seconds=30),
            spec=ev.TaskSpec(prompt="hi", timeout_s=5),
        )
    )
    service = h.lifecycle()
    await service.run_until_idle()
    assert await types_of(h.bus, task) == ["TaskRequested", "TaskTimedOut", "SandboxStopped"]
    assert count_container_events(h.tag, "create", time.time() - 60) == 0


# ---- the warm pool ---------------------------------------------------------------------------


async def test_a_task_claims_a_warm_sandbox_and_the_pool_refills(h: Harness) -> None:
    service = h.lifecycle(warm_pool=2)
    await service.start()
    await h.pool_ready(service, 2)
    before = {i.name for i in await h.pooled()}
    assert len(before) == 2 and all(is_unclaimed(i) for i in await h.pooled())
    task = task_id("warm")
    await h.request(task)
    started = await wait_for_event(h.bus, task, "SandboxStarted")
    assert isinstance(started, ev.SandboxStarted) and started.sandbox == sandbox_name(task)
    assert service.pool.claimed == 1 and service.pool.missed == 0
    data = await h.container(task)
    assert data is not None and data["State"]["Running"]
    assert data["HostConfig"]["NetworkMode"] == "none"  # made hardened, like any other
    assert data["Config"]["Labels"][LABEL_POOL] == "1"
    # The task's socket folder is the pool sandbox's, renamed: only uid 1000 reaches it.
    socket_dir = h.tmp / "model" / task
    assert socket_dir.is_dir() and (socket_dir.stat().st_mode & 0o777) == 0o700
    assert socket_dir.stat().st_uid == SANDBOX_UID
    assert service.admission.holds(task)  # a claimed sandbox is a task's: it holds a slot
    if isinstance(h.driver, DockerDriver):  # the bind mount followed the folder's rename
        (socket_dir / "probe").write_text(task)
        seen = await h.driver.exec(sandbox_name(task), ["cat", "/run/sandstream/probe"])
        assert seen.output.decode() == task
        # The agent's launcher waits in it: it runs, as the agent, the start the keeper hands
        # it (a file of the keeper's, then its bell), as the executor's follow does.
        ran = "/tmp/launched"
        entries = launch.request({"PROBE": task}, ["bash", "-c", f'echo "$PROBE $(id -u)" >{ran}'])
        keeper = (
            f"for i in $(seq 500); do [ -p {launch.BELL} ] && break; sleep 0.01; done; "
            f"printf '%s\\0' \"$@\" >{launch.REQUEST} && exec 6<>{launch.BELL} && printf x >&6"
        )
        argv = ["bash", "-c", keeper, "keeper", *entries]
        async with await h.driver.exec_stream(sandbox_name(task), argv, keeper=True) as proc:
            assert [line async for line in proc.lines()] == []
            assert await proc.wait() == 0, proc.stderr
        async with asyncio.timeout(10):
            while (said := await h.driver.exec(sandbox_name(task), ["cat", ran])).exit_code:
                await asyncio.sleep(0.02)
        assert said.output.decode() == f"{task} {SANDBOX_UID}\n"
        # The agent's forwarder to the model listens already (the launcher's): each connection
        # reaches the model socket, which came with the claim.
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await got.put(await reader.readexactly(4))
            writer.close()

        model_socket = socket_dir / SOCKET_NAME
        server = await asyncio.start_unix_server(answer, path=str(model_socket))
        os.chown(model_socket, SANDBOX_UID, SANDBOX_UID)
        try:
            connect = f"exec 3<>/dev/tcp/127.0.0.1/{MODEL_PORT}"
            ping = [
                "bash",
                "-c",  # up to 2 s for it to listen (it has had longer already)
                f"for i in $(seq 200); do {connect} 2>/dev/null && break; sleep 0.01; done; "
                "printf ping >&3",
            ]
            said = await h.driver.exec(sandbox_name(task), ping)
            assert said.exit_code == 0, said.output
            assert await asyncio.wait_for(got.get(), 10) == b"ping"
        finally:
            server.close()
            await server.wait_closed()
    await h.pool_ready(service, 2)  # refilled in the background
    after = await h.pooled()
    assert sum(is_unclaimed(i) for i in after) == 2 and len(after) == 3
    # Never handed back: the task's end removes it, and the pool stays as it is.
    await h.completed(task)
    await h.stored(task, "succeeded")
    assert await h.gone(task)
    left = await h.pooled()
    assert len(left) == 2 and all(is_unclaimed(i) for i in left)
    assert len(before & {i.name for i in left}) == 1  # the one not claimed, still waiting
    await service.stop()
    assert await h.pooled() == []  # a stopped lifecycle leaves no pool sandbox


async def test_a_lifecycle_stopped_while_it_fills_its_pool_leaves_no_sandbox(h: Harness) -> None:
    service = h.lifecycle(warm_pool=2)
    await service.start()
    async with asyncio.timeout(30):  # the first one made, the second on its way
        while not await h.pooled():
            await asyncio.sleep(0.01)
    await service.stop()
    # The one being made was finished, not cut off (the engine may complete a create whose
    # client left), and removed with the rest.
    assert await h.pooled() == []
    assert not list((h.tmp / "model").iterdir())


async def test_unclaimed_pool_sandboxes_of_a_crashed_lifecycle_are_reaped(h: Harness) -> None:
    crashed = h.lifecycle(warm_pool=1)
    left = await crashed.sandboxes.make_pooled()  # as a killed lifecycle leaves it
    assert (h.tmp / "model" / left).is_dir()
    service = h.lifecycle(warm_pool=1)
    await service.start()
    await h.pool_ready(service, 1)
    names = [i.name for i in await h.pooled()]
    assert sandbox_name(left) not in names and len(names) == 1
    assert not (h.tmp / "model" / left).exists()
    task = task_id("after")
    await h.request(task)
    await wait_for_event(h.bus, task, "SandboxStarted")
    assert service.pool.claimed == 1


async def test_an_empty_pool_or_a_retried_start_makes_a_sandbox_as_before(h: Harness) -> None:
    service = h.lifecycle(warm_pool=1)
    first, second = task_id("first"), task_id("second")
    # A previous try of `second` got as far as its folder: it must not be given a pool one.
    (h.tmp / "model" / second).mkdir(parents=True)
    await service.start()
    await h.pool_ready(service, 1)
    await h.request(second)
    await wait_for_event(h.bus, second, "SandboxStarted")
    assert service.pool.claimed == 0
    data = await h.container(second)
    assert data is not None and data["Config"]["Labels"][LABEL_TASK] == second
    await h.request(first)
    await wait_for_event(h.bus, first, "SandboxStarted")
    assert service.pool.claimed == 1
