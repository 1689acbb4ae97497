"""``python -m services.lifecycle`` (and ``sandstream lifecycle``): the lifecycle service.

Configured by the environment (``shared.settings.load``). SIGTERM/SIGINT stop it gracefully:
waiting tasks go back to the stream, in-flight work finishes within a bound, then NATS drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import structlog

from services.lifecycle.service import Lifecycle, LifecycleOptions
from shared import logging as slog
from shared.bus import Bus, StreamSettings, connect
from shared.errors import Unavailable
from shared.sandbox import DockerDriver
from shared.settings import Settings, load

log = structlog.get_logger("sandstream.lifecycle")


async def serve(settings: Settings) -> None:
    """Connect NATS and Docker, run the service until SIGTERM/SIGINT."""
    nc = await connect(settings.nats_url, name="sandstream-lifecycle")
    driver: DockerDriver | None = None
    try:
        bus = Bus(nc, StreamSettings.of(settings))
        await bus.ensure_stream()
        driver = await DockerDriver.connect()
        options = LifecycleOptions(
            memory_bytes=settings.sandbox_memory_mb * 2**20,
            nano_cpus=int(settings.sandbox_cpus * 1e9),
            pids_limit=settings.sandbox_pids,
        )
        service = Lifecycle(bus=bus, driver=driver, settings=settings, options=options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.request_stop)
        log.info(
            "lifecycle running",
            stream=settings.stream,
            image=settings.sandbox_image,
            max_concurrent=settings.max_concurrent,
            max_per_tenant=settings.max_per_tenant,
        )
        try:
            await service.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        if driver is not None:
            await driver.close()
        with contextlib.suppress(Exception):
            await nc.drain()


def main() -> int:
    settings = load()
    slog.configure(os.environ.get("SANDSTREAM_LOG_LEVEL", "INFO"))
    try:
        asyncio.run(serve(settings))
    except Unavailable as exc:
        log.error("cannot start", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
