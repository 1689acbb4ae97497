"""``sandstream storage``: store results of finished tasks (settings from the environment).

SIGTERM or SIGINT stops fetching, lets in-flight results finish (bounded), then drains NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from services.storage.service import DURABLE, StorageService
from shared import service, settings
from shared.blobstore import open_store
from shared.service import cancel_and_wait, close_bus, open_bus

log = structlog.get_logger("sandstream.storage")


async def serve(config: settings.Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the storage service until ``stop`` is set (or SIGTERM/SIGINT arrives).

    Raises :class:`Unavailable` if NATS cannot be reached at start, ``SystemExit`` for a
    malformed storage URL.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = await open_store(config.results_url, endpoint_url=config.s3_endpoint_url)
        except ValueError as exc:
            raise SystemExit(f"sandstream storage: bad SANDSTREAM_STORAGE_URL: {exc}") from None
        stack.push_async_callback(store.close)
        bus = await open_bus(config, "storage")
        stack.push_async_callback(close_bus, bus)
        service = StorageService(
            bus=bus,
            store=store,
            durable=config.consumer_prefix + DURABLE,
            concurrency=config.max_concurrent,
            ack_wait=config.ack_wait_s,
            max_deliver=config.store_max_deliver,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)

        runner = asyncio.create_task(service.run(), name="storage-worker")
        stack.push_async_callback(cancel_and_wait, runner)
        log.info("storage started", store=store.url, stream=config.stream)
        stopping = asyncio.create_task(stop.wait(), name="storage-stop")
        try:
            await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopping)
        if runner.done():
            await runner  # the worker crashed: let its error show
        else:
            log.info("storage stopping")
            await service.stop(grace=10.0)
            # In-flight results are finished; the worker may still sit in a fetch for up to
            # its timeout: end it now (a batch fetched meanwhile comes back after ack_wait).
            await cancel_and_wait(runner)
    log.info("storage stopped")


def main() -> int:
    return service.run("storage", serve)


if __name__ == "__main__":
    raise SystemExit(main())
