"""One contract, two drivers: the in-memory one of the fast tests and Docker behave alike where
the services depend on it (tests/support/memory_driver.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest

from shared import events as ev
from shared.errors import Permanent
from shared.sandbox import (
    LABEL_POOL,
    LABEL_TASK,
    POOL_PREFIX,
    SandboxDriver,
    SandboxError,
    SandboxNotFound,
    SandboxSpec,
    is_unclaimed,
    sandbox_name,
)
from tests.support.memory_driver import MemoryDriver
from tests.support.sandboxes import TEST_LABEL, docker_driver, sandbox_image


@dataclass
class Engine:
    driver: SandboxDriver
    tag: str
    image: str

    def spec(self, image: str | None = None) -> SandboxSpec:
        return SandboxSpec(
            task_id=ev.new_task_id(),
            tenant="acme",
            image=image or self.image,
            deadline=time.time() + 600,
            labels={TEST_LABEL: self.tag},
            memory_bytes=128 << 20,
        )


@pytest.fixture(params=["memory", pytest.param("docker", marks=pytest.mark.docker)])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "memory":
        yield Engine(MemoryDriver(missing_images=["sandstream/nothing:0"]), "mem", "img")
        return
    async with docker_driver() as (driver, tag):
        yield Engine(driver, tag, sandbox_image())


async def test_a_second_create_adopts_the_first(engine: Engine) -> None:
    spec = engine.spec()
    first = await engine.driver.create(spec)
    again = await engine.driver.create(spec)
    assert not first.adopted and again.adopted and again.id == first.id
    assert (first.name, first.task_id, first.tenant) == (spec.name, spec.task_id, "acme")
    spec2 = engine.spec()  # racing creates (two deliveries at once): one sandbox
    infos = await asyncio.gather(*(engine.driver.create(spec2) for _ in range(4)))
    assert len({i.id for i in infos}) == 1 and sum(not i.adopted for i in infos) == 1
    assert infos[0].id != first.id


async def test_start_kill_remove_and_absence(engine: Engine) -> None:
    d = engine.driver
    info = await d.create(engine.spec())
    data = await d.inspect(info.name)
    assert data is not None and not data["State"]["Running"]
    await d.start(info.name)
    await d.start(info.name)  # starting a running sandbox is fine
    data = await d.inspect(info.name)
    assert data is not None and data["State"]["Running"]
    assert data["Config"]["Labels"][LABEL_TASK] == info.task_id
    await d.kill(info.name)
    data = await d.inspect(info.name)
    assert data is not None and not data["State"]["Running"]
    await d.remove(info.name)
    assert await d.inspect(info.name) is None
    await d.remove(info.name)  # absent: fine
    await d.kill(info.name)  # absent: fine
    with pytest.raises(SandboxNotFound):
        await d.start(info.name)
    usage = await d.usage(info.name)
    assert usage.wall_ms == 0 and usage.cpu_seconds == 0


async def test_list_filters_by_labels(engine: Engine) -> None:
    d = engine.driver
    one, two = await d.create(engine.spec()), await d.create(engine.spec())
    ours = {i.name for i in await d.list(f"{TEST_LABEL}={engine.tag}")}
    assert {one.name, two.name} <= ours
    assert [i.name for i in await d.list([TEST_LABEL, f"{LABEL_TASK}={one.task_id}"])] == [one.name]
    assert await d.list(f"{TEST_LABEL}=other-{uuid.uuid4().hex[:8]}") == []


async def test_a_pooled_sandbox_is_claimed_by_a_rename(engine: Engine) -> None:
    d = engine.driver
    pool_name = f"{POOL_PREFIX}{uuid.uuid4().hex[:16]}"
    spec = msgspec.structs.replace(engine.spec(), task_id=pool_name, pooled=True)
    pooled = await d.create(spec)
    await d.start(pooled.name)
    (listed,) = await d.list([f"{TEST_LABEL}={engine.tag}", LABEL_POOL])
    assert listed.name == pooled.name and is_unclaimed(listed)
    assert LABEL_TASK not in listed.labels and listed.deadline is None  # no task yet
    other = await d.create(engine.spec())
    with pytest.raises(SandboxError) as taken:
        await d.rename(pooled.name, other.name)
    assert not isinstance(taken.value, SandboxNotFound)
    task = ev.new_task_id()
    await d.rename(pooled.name, sandbox_name(task))
    assert await d.inspect(pooled.name) is None
    data = await d.inspect(sandbox_name(task))
    assert data is not None and data["State"]["Running"]  # renamed while running
    (claimed,) = await d.list([f"{TEST_LABEL}={engine.tag}", LABEL_POOL])
    assert claimed.task_id == task and not is_unclaimed(claimed)
    with pytest.raises(SandboxNotFound):
        await d.rename(pooled.name, sandbox_name(ev.new_task_id()))


async def test_a_missing_image_is_permanent(engine: Engine) -> None:
    with pytest.raises(Permanent) as refused:
        await engine.driver.create(engine.spec("sandstream/nothing:0"))
    assert refused.value.code == "image_missing"
