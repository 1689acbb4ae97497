"""The one shape of every Sandstream process: ``main()`` → :func:`run` → ``serve(settings)``.

Each service's ``serve`` is::

    async with lifetime("executor", stop) as life:
        bus = await life.bus(settings)            # resources, closed in reverse order
        ...
        await life.run(worker.run(), graceful=worker.stop, stream=settings.stream)

SIGTERM/SIGINT (or ``stop``) end ``run``: the main coroutine is asked to finish its work
(``graceful``), then cancelled; an error it died of is raised, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
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


class Lifetime:
    """A service's resources and its main loop (see the module's docstring)."""

    def __init__(self, name: str, stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
        self.name = name
        self.stop = stop
        self._stack = stack
        self._log = structlog.get_logger(f"sandstream.{name.replace(' ', '')}")

    def closing(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Call ``close`` when the service ends (after everything opened later is closed)."""
        self._stack.push_async_callback(close)

    async def bus(self, settings: Settings) -> Bus:
        bus = await open_bus(settings, self.name)
        self._stack.push_async_callback(close_bus, bus)
        return bus

    async def run(
        self,
        main: Coroutine[Any, Any, None] | None = None,
        *,
        graceful: Callable[[], Awaitable[Any]] | None = None,
        **about: Any,
    ) -> None:
        """Run ``main`` until it ends or the stop is asked for (without ``main``: until the
        stop). On a stop, ``graceful()`` first, then ``main`` is cancelled."""
        self._log.info(f"{self.name} running", **about)
        # What start-up made (modules, settings, connections) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it (they were a
        # tail latency of every request).
        gc.collect()
        gc.freeze()
        stopping = asyncio.create_task(self.stop.wait(), name=f"{self.name}-stop")
        runner = asyncio.create_task(main, name=self.name) if main is not None else None
        try:
            await asyncio.wait(
                {stopping} | ({runner} if runner else set()), return_when=asyncio.FIRST_COMPLETED
            )
            if runner is not None and not runner.done():
                self._log.info(f"{self.name} stopping")
                if graceful is not None:
                    await graceful()
        finally:
            await cancel_and_wait(stopping)
            if runner is not None:
                await cancel_and_wait(runner)
        if runner is not None and not runner.cancelled() and runner.exception() is not None:
            raise runner.exception()  # type: ignore[misc]


@contextlib.asynccontextmanager
async def lifetime(name: str, stop: asyncio.Event | None = None) -> AsyncIterator[Lifetime]:
    """A service's lifetime: SIGTERM/SIGINT set ``stop``; resources close at the end."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        life = Lifetime(name, stack, stop)
        yield life
    life._log.info(f"{name} stopped")
