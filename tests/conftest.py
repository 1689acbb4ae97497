"""Shared fixtures: a private nats-server per test session, and a fresh stream per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
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
