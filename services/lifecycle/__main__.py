"""``python -m services.lifecycle`` (and ``sandstream lifecycle``): the lifecycle service.

Configured by the environment (``shared.settings.load``). SIGTERM/SIGINT stop it gracefully:
waiting tasks go back to the stream, in-flight work finishes within a bound, then NATS drains.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

from services.lifecycle.service import Lifecycle, LifecycleOptions
from shared import service
from shared.sandbox import DockerDriver
from shared.service import close_bus, open_bus
from shared.settings import Settings

log = structlog.get_logger("sandstream.lifecycle")


async def serve(settings: Settings) -> None:
    """Connect NATS and Docker, run the service until SIGTERM/SIGINT."""
    bus = await open_bus(settings, "lifecycle")
    driver: DockerDriver | None = None
    try:
        driver = await DockerDriver.connect()
        options = LifecycleOptions.of(settings)
        lifecycle = Lifecycle(bus=bus, driver=driver, settings=settings, options=options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lifecycle.request_stop)
        log.info(
            "lifecycle running",
            stream=settings.stream,
            image=settings.sandbox_image,
            max_concurrent=settings.max_concurrent,
            max_per_tenant=settings.max_per_tenant,
        )
        try:
            await lifecycle.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        if driver is not None:
            await driver.close()
        await close_bus(bus)


def main() -> int:
    return service.run("lifecycle", serve)


if __name__ == "__main__":
    raise SystemExit(main())
