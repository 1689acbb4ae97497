"""A real gateway on a free loopback port, for tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from services.gateway.app import create_app
from services.gateway.keys import PROJECTION
from shared.bus import StreamSettings
from shared.settings import Settings
from shared.tokens import create_token
from tests.support.procs import NatsServer, free_port


class Gateway:
    def __init__(self, nats: NatsServer, stream: StreamSettings, tmp: Path, **extra: Any) -> None:
        self.port = free_port()
        self.settings = Settings(
            nats_url=nats.url,
            nats_nkey=nats.auth("gateway").nkey,
            data_dir=tmp,
            tokens_file=tmp / "tokens",
            stream=stream.name,
            subject_prefix=stream.subject_prefix,
            duplicate_window_s=stream.duplicate_window_s,
            port=self.port,
            **extra,
        )
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, tenant: str) -> str:
        return create_token(self.settings.tokens_path, tenant)

    async def start(self) -> None:
        self.app = create_app(self.settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> Gateway:
        """Started and ready (connected, projection rebuilt); stopped on exit."""
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the gateway has connected and rebuilt its projection."""
        assert self.app is not None
        await asyncio.wait_for(self.app[PROJECTION].ready.wait(), timeout)
