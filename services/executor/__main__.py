"""``python -m services.executor`` (and ``sandstream executor``): the executor service.

Configured by the environment (``shared.settings.load``). It holds no model credential: the
model proxy, another process, does (``services.modelproxy``); the executor asks it over its
control socket to open and close a task's model socket. SIGTERM/SIGINT stop fetching;
in-flight handlers get a few seconds, then are cancelled (their agents keep running in the
sandboxes, and the redelivered messages re-attach to them).
"""

from __future__ import annotations

import asyncio

import structlog

from services.executor.service import DURABLE, Executor, ExecutorConfig
from services.modelproxy.control import ProxyClient
from shared import service
from shared.blobstore import open_store
from shared.sandbox import DockerDriver
from shared.settings import Settings

log = structlog.get_logger("sandstream.executor")

STOP_GRACE_S = 5.0


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the executor until ``stop`` is set or SIGTERM/SIGINT arrives.

    Raises :class:`Unavailable` when NATS or Docker cannot be reached at start (a model proxy
    that does not answer only holds tasks back until it does).
    """
    async with service.lifetime("executor", stop) as life:
        proxy = ProxyClient(settings.model_proxy_socket)
        life.closing(proxy.close)
        bus = await life.bus(settings)
        driver = await DockerDriver.connect()
        life.closing(driver.close)
        try:  # where a branch's bundle goes (output.branch)
            store = await open_store(settings.results_url, endpoint_url=settings.s3_endpoint_url)
        except ValueError as exc:
            raise SystemExit(f"sandstream executor: bad SANDSTREAM_STORAGE_URL: {exc}") from None
        life.closing(store.close)
        executor = Executor(
            bus=bus, driver=driver, proxy=proxy, config=ExecutorConfig.of(settings), store=store
        )
        swept = executor.fetcher.sweep(older_than_s=2 * 3600)  # tasks live an hour at most
        if swept:
            log.info("removed repositories left by earlier runs", count=swept)
        worker = executor.worker(
            durable=settings.consumer_prefix + DURABLE,
            concurrency=settings.max_concurrent,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        await life.run(
            worker.run(),
            graceful=lambda: worker.stop(timeout=STOP_GRACE_S),
            stream=settings.stream,
            model_proxy=str(settings.model_proxy_socket),
        )


def main() -> int:
    return service.run("executor", serve)


if __name__ == "__main__":
    raise SystemExit(main())
