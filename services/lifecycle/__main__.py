"""``python -m services.lifecycle`` (and ``sandstream lifecycle``): the lifecycle service.

Configured by the environment (``shared.settings.load``). SIGTERM/SIGINT stop it gracefully:
waiting tasks go back to the stream, in-flight work finishes within a bound, then NATS drains.
"""

from __future__ import annotations

import asyncio

import structlog

from services.lifecycle.service import Lifecycle, LifecycleOptions
from shared import service
from shared.sandbox import DockerDriver
from shared.settings import Settings

log = structlog.get_logger("sandstream.lifecycle")


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Connect NATS and Docker, run the service until ``stop`` or SIGTERM/SIGINT."""
    async with service.lifetime("lifecycle", stop) as life:
        bus = await life.bus(settings)
        driver = await DockerDriver.connect()
        life.closing(driver.close)
        options = LifecycleOptions.of(settings)
        lifecycle = Lifecycle(bus=bus, driver=driver, settings=settings, options=options)
        await life.run(
            lifecycle.run(),
            graceful=lifecycle.stop,
            stream=settings.stream,
            image=settings.sandbox_image,
            max_concurrent=settings.max_concurrent,
            max_per_tenant=settings.max_per_tenant,
        )


def main() -> int:
    return service.run("lifecycle", serve)


if __name__ == "__main__":
    raise SystemExit(main())
