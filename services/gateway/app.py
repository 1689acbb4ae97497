"""The gateway application: ``web.run_app(create_app(settings))``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from services.gateway.http import MAX_BODY, errors_middleware
from services.gateway.keys import (
    AUTH,
    BUS_LINK,
    LIMITS,
    METRICS,
    PROJECTION,
    RESULTS,
    SETTINGS,
    UPLOADS,
)
from services.gateway.limits import TenantLimits
from services.gateway.link import BusLink
from services.gateway.metrics import Metrics
from services.gateway.projection import Projection
from services.gateway.results import ResultReader
from services.gateway.routes import routes
from services.gateway.sse import routes as sse_routes
from shared.bus import NatsAuth, StreamSettings
from shared.events import AnyEvent, TaskRequested
from shared.settings import Settings
from shared.tokens import TokenStore

LARGE_BODIES_AT_ONCE = 8


async def _event_log(app: web.Application) -> AsyncIterator[None]:
    """Connect in the background, then keep the projection following the stream."""
    link, projection = app[BUS_LINK], app[PROJECTION]

    async def run() -> None:
        bus = await link.establish()
        await projection.follow(bus)

    task = asyncio.create_task(run(), name="gateway-event-log")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await link.close()


async def _results(app: web.Application) -> AsyncIterator[None]:
    reader = app[RESULTS]
    await reader.open()
    yield
    await reader.close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_middleware])
    app[SETTINGS] = settings
    app[AUTH] = TokenStore(settings.tokens_path)
    app[BUS_LINK] = BusLink(
        settings.nats_url, StreamSettings.of(settings), auth=NatsAuth.of(settings)
    )
    metrics, limits = Metrics(), TenantLimits(settings)
    projection = Projection()

    def on_event(event: AnyEvent) -> None:
        metrics.stages.observe(event)
        # A new task, live (not the history read at start): its tenant's rate counts it,
        # whichever gateway process accepted it.
        if isinstance(event, TaskRequested) and projection.ready.is_set():
            limits.folded(event.tenant, event.task_id)

    projection.on_event = on_event
    app[METRICS], app[PROJECTION], app[LIMITS] = metrics, projection, limits
    app[RESULTS] = ResultReader(settings)
    app[UPLOADS] = asyncio.Semaphore(LARGE_BODIES_AT_ONCE)
    app.cleanup_ctx.append(_event_log)
    app.cleanup_ctx.append(_results)
    app.add_routes(routes)
    app.add_routes(sse_routes)
    return app
