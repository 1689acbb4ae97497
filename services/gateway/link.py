"""The gateway's connection to the event log, made in the background and kept alive.

The gateway starts and answers even when NATS is down: requests that need the log get
``503 unavailable`` at once, and the link connects (and reconnects) by itself.
"""

from __future__ import annotations

import asyncio

import structlog

from shared.bus import Bus, NatsAuth, StreamSettings, connect
from shared.errors import Unavailable

log = structlog.get_logger("sandstream.gateway")


class BusLink:
    def __init__(
        self,
        url: str,
        stream: StreamSettings,
        *,
        auth: NatsAuth | None = None,
        name: str = "gateway",
    ) -> None:
        self.url = url
        self.auth = auth
        self.stream = stream
        self.name = name
        self.bus: Bus | None = None
        self.up = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.connected

    def require(self) -> Bus:
        """The bus, or :class:`Unavailable` right away when NATS is not connected."""
        if self.bus is None or not self.bus.connected:
            raise Unavailable("the event log (NATS) is unreachable; retry shortly")
        return self.bus

    async def establish(self) -> Bus:
        """Connect (retrying every second until it works) and make sure the stream exists."""
        while True:
            try:
                nc = await connect(self.url, name=self.name, auth=self.auth, connect_timeout=1.0)
                bus = Bus(nc, self.stream)
                await bus.ensure_stream()
            except Unavailable as exc:
                log.warning("waiting for NATS", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self.bus = bus
            self.up.set()
            log.info("connected to NATS", url=self.url)
            return bus

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.nc.close()
            self.bus = None
