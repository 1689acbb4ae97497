"""``sandstream gateway``: serve the HTTP API (settings from the environment)."""

from __future__ import annotations

from aiohttp import web

from services.gateway.app import create_app
from shared import logging, settings


def main() -> None:
    logging.configure()
    config = settings.load()
    web.run_app(create_app(config), host=config.host, port=config.port, print=None)


if __name__ == "__main__":
    main()
