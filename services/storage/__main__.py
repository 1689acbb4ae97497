"""``sandstream storage``: store results of finished tasks (settings from the environment).

SIGTERM or SIGINT stops fetching, lets in-flight results finish (bounded), then drains NATS.
"""

from __future__ import annotations

import asyncio

import structlog

from services.storage.service import DURABLE, StorageService
from shared import service, settings
from shared.blobstore import open_store

log = structlog.get_logger("sandstream.storage")


async def serve(config: settings.Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the storage service until ``stop`` is set (or SIGTERM/SIGINT arrives).

    Raises :class:`Unavailable` if NATS cannot be reached at start, ``SystemExit`` for a
    malformed storage URL.
    """
    async with service.lifetime("storage", stop) as life:
        try:
            store = await open_store(config.results_url, endpoint_url=config.s3_endpoint_url)
        except ValueError as exc:
            raise SystemExit(f"sandstream storage: bad SANDSTREAM_STORAGE_URL: {exc}") from None
        life.closing(store.close)
        bus = await life.bus(config)
        storage = StorageService(
            bus=bus,
            store=store,
            durable=config.consumer_prefix + DURABLE,
            concurrency=config.max_concurrent,
            ack_wait=config.ack_wait_s,
            max_deliver=config.store_max_deliver,
        )
        # A graceful stop finishes in-flight results; the worker may still sit in a fetch
        # for up to its timeout and is then cancelled (a batch fetched meanwhile comes back
        # after ack_wait).
        await life.run(
            storage.run(),
            graceful=lambda: storage.stop(grace=10.0),
            store=store.url,
            stream=config.stream,
        )


def main() -> int:
    return service.run("storage", serve)


if __name__ == "__main__":
    raise SystemExit(main())
