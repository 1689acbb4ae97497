"""The chaos run, small: ~15 tasks, a kill every 1.5 s, one nats-server restart (make test).

The full run is ``python -m tests.chaos`` (``make chaos``); this is the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.chaos.run import ChaosConfig, run
from tests.chaos.system import docker_problem

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def quiet_fake_model() -> Iterator[None]:
    """The fake model's server logs a traceback whenever a killed executor cuts a reply."""
    server = logging.getLogger("aiohttp.server")
    level = server.level
    server.setLevel(logging.CRITICAL)
    yield
    server.setLevel(level)


@pytest.mark.timeout(420)
@pytest.mark.usefixtures("quiet_fake_model")
async def test_a_small_chaos_run_loses_nothing_and_duplicates_nothing() -> None:
    problem = docker_problem()
    if problem is not None:
        pytest.skip(problem)
    progress: list[str] = []
    report = await run(
        ChaosConfig(
            tasks=15,
            kill_every=1.5,
            max_concurrent=4,
            nats_restarts=1,
            timeout=300,
            say=progress.append,
        )
    )
    print(report.summary())
    assert report.passed, "\n".join([*progress, report.summary()])
    assert report.accepted == 15 and report.statuses["succeeded"] == 15
    assert not report.lost and not report.orphans and not report.violations
    assert sum(report.duplicates.values()) == 0
