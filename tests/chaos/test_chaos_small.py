"""The chaos run, small: ~15 tasks, a kill every 1.5 s, one nats-server restart (make test).

The full run is ``python -m tests.chaos`` (``make chaos``); this is the same code.
"""

from __future__ import annotations

import pytest

from tests.chaos.run import ChaosConfig, run
from tests.chaos.system import docker_problem

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.mark.timeout(420)
async def test_a_small_chaos_run_loses_nothing_and_duplicates_nothing() -> None:
    problem = docker_problem()
    if problem is not None:
        pytest.skip(problem)
    report = await run(
        ChaosConfig(
            tasks=15,
            kill_every=1.5,
            max_concurrent=4,
            nats_restarts=1,
            timeout=300,
            say=lambda line: None,
        )
    )
    print(report.summary())
    assert report.passed, report.summary()
    assert report.accepted == 15 and report.statuses["succeeded"] == 15
    assert not report.lost and not report.orphans and not report.violations
    assert sum(report.duplicates.values()) == 0
