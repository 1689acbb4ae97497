"""What every worker service's ``main()`` shares: logging, settings, the bus, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from shared import logging
from shared.bus import Bus, NatsAuth, StreamSettings, connect
from shared.errors import Unavailable
from shared.settings import Settings, load

log = structlog.get_logger("sandstream.service")


def run(name: str, serve: Callable[[Settings], Coroutine[Any, Any, None]]) -> int:
    """Configure logging (``SANDSTREAM_LOG_LEVEL``), load settings, run ``serve`` to the end.

    Returns the process exit code: 0 after a clean stop, 2 when a dependency (NATS, Docker)
    cannot be reached at start; a malformed setting exits with a message naming it.
    """
    logging.configure(os.environ.get("SANDSTREAM_LOG_LEVEL", "INFO"))
    settings = load()
    try:
        asyncio.run(serve(settings))
    except Unavailable as exc:
        log.error(f"{name} cannot start", error=str(exc))
        return 2
    return 0


async def open_bus(settings: Settings, name: str) -> Bus:
    """Connect to NATS (fails fast with :class:`Unavailable`) and check the stream."""
    nc = await connect(settings.nats_url, name=f"sandstream-{name}", auth=NatsAuth.of(settings))
    bus = Bus(nc, StreamSettings.of(settings))
    try:
        await bus.ensure_stream()
    except BaseException:
        await close_bus(bus)
        raise
    return bus


async def close_bus(bus: Bus) -> None:
    """Drain the connection: pending acks and publishes go out before it closes."""
    with contextlib.suppress(Exception):
        await bus.nc.drain()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, without re-raising its outcome."""
    if not task.done():
        task.cancel()
    await asyncio.wait({task})
