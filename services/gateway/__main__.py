"""``sandstream gateway``: serve the HTTP API (settings from the environment)."""

from __future__ import annotations

from aiohttp import web

from services.gateway.app import create_app
from shared import logging, settings

SHUTDOWN_GRACE_S = 5.0


def main() -> None:
    logging.configure()
    config = settings.load()
    # Long polls (?wait) and SSE streams would hold a graceful stop for up to a minute; after
    # a few seconds they are cut, and their clients reconnect (SSE with Last-Event-ID).
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None,
    )


if __name__ == "__main__":
    main()
