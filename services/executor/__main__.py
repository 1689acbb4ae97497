"""``python -m services.executor`` (and ``sandstream executor``): the executor service.

Configured by the environment (``shared.settings.load``). It holds no model credential: the
model proxy, another process, does (``services.modelproxy``); the executor asks it over its
control socket to open and close a task's model socket. SIGTERM/SIGINT stop fetching;
in-flight handlers get a few seconds, then are cancelled (their agents keep running in the
sandboxes, and the redelivered messages re-attach to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from services.executor.service import DURABLE, Executor, ExecutorConfig
from services.modelproxy.control import ProxyClient
from shared import service
from shared.sandbox import DockerDriver
from shared.service import cancel_and_wait, close_bus, open_bus
from shared.settings import Settings

log = structlog.get_logger("sandstream.executor")

STOP_GRACE_S = 5.0


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the executor until ``stop`` is set or SIGTERM/SIGINT arrives.

    Raises :class:`Unavailable` when NATS or Docker cannot be reached at start (a model proxy
    that does not answer only holds tasks back until it does).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        proxy = ProxyClient(settings.model_proxy_socket)
        stack.push_async_callback(proxy.close)
        bus = await open_bus(settings, "executor")
        stack.push_async_callback(close_bus, bus)
        driver = await DockerDriver.connect()
        stack.push_async_callback(driver.close)
        config = ExecutorConfig(max_output_bytes=settings.max_output_bytes)
        executor = Executor(bus=bus, driver=driver, proxy=proxy, config=config)
        worker = executor.worker(
            durable=settings.consumer_prefix + DURABLE,
            concurrency=settings.max_concurrent,
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        runner = asyncio.create_task(worker.run(), name="executor-worker")
        stack.push_async_callback(cancel_and_wait, runner)
        log.info(
            "executor running",
            stream=settings.stream,
            model_proxy=str(settings.model_proxy_socket),
        )
        stopping = asyncio.create_task(stop.wait(), name="executor-stop")
        try:
            await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopping)
        if not runner.done():
            log.info("executor stopping")
            await worker.stop(timeout=STOP_GRACE_S)
        await cancel_and_wait(runner)
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            raise runner.exception()  # type: ignore[misc]
    log.info("executor stopped")


def main() -> int:
    return service.run("executor", serve)


if __name__ == "__main__":
    raise SystemExit(main())
