"""``sandstream gateway``: serve the HTTP API (settings from the environment).

The app (``app.create_app``) holds its own connections in aiohttp's ``cleanup_ctx``; this
process runs it in the same :func:`shared.service.lifetime` as the other services.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.gateway.app import create_app
from shared import service
from shared.settings import Settings

SHUTDOWN_GRACE_S = 5.0
"""Long polls (``?wait``) and SSE streams would hold a graceful stop for up to a minute;
after a few seconds they are cut, and their clients reconnect (SSE with Last-Event-ID)."""


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the API until ``stop`` or SIGTERM/SIGINT; :class:`Unavailable` when NATS cannot
    be reached at start."""
    async with service.lifetime("gateway", stop) as life:
        runner = web.AppRunner(
            create_app(settings), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await runner.setup()
        life.closing(runner.cleanup)
        await web.TCPSite(runner, settings.host, settings.port).start()
        await life.run(host=settings.host, port=settings.port, stream=settings.stream)


def main() -> int:
    return service.run("gateway", serve)


if __name__ == "__main__":
    raise SystemExit(main())
