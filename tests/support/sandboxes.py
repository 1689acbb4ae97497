"""Helpers for tests that use the real Docker engine and the sandbox image.

Every test labels the containers it makes with its own ``sandstream.test=<uuid>`` and removes
them by that label at the end, so tests never touch each other's (or anyone else's) containers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from shared import events as ev
from shared.bus import Bus
from shared.errors import Unavailable
from shared.sandbox import DockerDriver
from shared.settings import DEFAULT_IMAGE

TEST_LABEL = "sandstream.test"


def sandbox_image() -> str:
    return os.environ.get("SANDSTREAM_SANDBOX_IMAGE") or DEFAULT_IMAGE


@asynccontextmanager
async def docker_driver() -> AsyncIterator[tuple[DockerDriver, str]]:
    """A connected driver and this test's label; skips when Docker or the image is missing.

    On exit every container carrying the label is removed.
    """
    try:
        driver = await DockerDriver.connect()
    except Unavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        try:
            await driver.docker.images.inspect(sandbox_image())
        except Exception:
            pytest.skip(f"the sandbox image {sandbox_image()} is missing (run `make image`)")
        tag = uuid.uuid4().hex[:12]
        try:
            yield driver, tag
        finally:
            for info in await driver.list(f"{TEST_LABEL}={tag}"):
                await driver.remove(info.name)
    finally:
        await driver.close()


def count_container_events(tag: str, event: str, since: float) -> int:
    """How many ``event`` (create, start, destroy...) the engine logged for this test's label."""
    out = subprocess.run(
        [
            "docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
            "--filter", "type=container", "--filter", f"event={event}",
            "--filter", f"label={TEST_LABEL}={tag}", "--format", "{{.Actor.Attributes.name}}",
        ],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return len([line for line in out.stdout.splitlines() if line.strip()])


async def wait_for_event(
    bus: Bus, task_id: str, event_type: str, timeout: float = 30.0
) -> ev.AnyEvent:
    """The first ``event_type`` of the task, waiting for it to be published."""
    async with asyncio.timeout(timeout):
        async for record in bus.read(bus.subject(task_id, event_type), follow=True):
            return record.event
    raise AssertionError("unreachable")


async def history(bus: Bus, task_id: str) -> list[ev.AnyEvent]:
    return [r.event async for r in bus.read(bus.task_filter(task_id))]


async def types_of(bus: Bus, task_id: str) -> list[str]:
    return [ev.type_name(type(e)) for e in await history(bus, task_id)]
