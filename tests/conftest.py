"""Shared fixtures: a private nats-server per test session, and a fresh stream per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from shared.bus import Bus, StreamSettings, connect
from tests.support.procs import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stream_settings() -> StreamSettings:
    """Each test gets its own stream and subject prefix, so tests cannot see each other."""
    tag = uuid.uuid4().hex[:12]
    return StreamSettings(name=f"T{tag}", subject_prefix=f"t{tag}", duplicate_window_s=120)


@pytest.fixture
async def bus(nats_server: NatsServer, stream_settings: StreamSettings) -> AsyncIterator[Bus]:
    nc = await connect(nats_server.url, name="test", auth=nats_server.auth())
    b = Bus(nc, stream_settings)
    await b.ensure_stream()
    yield b
    await nc.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# ---- skips are failures where the suite is meant to be complete -------------------------------
#
# `make test` (and so CI) sets SANDSTREAM_NO_SKIPS=1: there every dependency has been
# installed by the Makefile, so a test that skips (no Docker engine, no image, no CLI) would
# report green for something that was never tested. ALLOWED_SKIPS lists the exceptions by
# node id, each with its reason; it is empty on purpose.
ALLOWED_SKIPS: dict[str, str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    forbidden = os.environ.get("SANDSTREAM_NO_SKIPS") == "1"
    skipped = report.skipped and not hasattr(report, "wasxfail")
    if forbidden and skipped and item.nodeid not in ALLOWED_SKIPS:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, but SANDSTREAM_NO_SKIPS=1 forbids skips here: {reason}\n"
            "Install what it names (make test does), or list it in ALLOWED_SKIPS "
            "in tests/conftest.py with a reason."
        )
    return report
