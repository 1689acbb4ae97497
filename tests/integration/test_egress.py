"""The egress proxy against real servers on loopback, through its Unix socket (no Docker).

Names are pinned to 127.0.0.1 (``SANDSTREAM_EGRESS_HOSTS``), as in every test here: nothing
leaves this machine.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from services.modelproxy.egress import EgressLimits, EgressProxy
from shared import egress
from shared import events as ev
from shared.egress import parse_pins
from tests.support.serve import serving
from tests.support.tls import self_signed


def pins(port: int, *names: str) -> dict[str, egress.Pin]:
    """Names pinned to this machine, on ``port`` only."""
    return parse_pins(",".join(f"{name}=127.0.0.1:{port}" for name in names))


PINNED = ("allowed.test", "other.test")


@pytest.fixture
async def origin() -> AsyncIterator[int]:
    """An HTTP server: /hello, /big (1 MiB), /redirect (to other.test)."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {request.host}")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (1 << 20))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://other.test:{request.url.port}/hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/big", big)
    app.router.add_get("/redirect", redirect)
    async with serving(app) as port:
        yield port


async def ask(path: Path, head: str, then: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(head.encode() + then)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_allowed_names_pass_and_everything_else_is_refused_and_counted(
    tmp_path: Path, origin: int
) -> None:
    proxy = EgressProxy(socket_dir=tmp_path, pins=pins(origin, *PINNED))
    task = ev.new_task_id()
    allow = [f"allowed.test:{origin}", f"localhost:{origin}", "allowed.test:4222"]
    sock = await proxy.add_task(task, allow)
    try:
        ok = await ask(sock, f"GET http://allowed.test:{origin}/hello HTTP/1.1\r\nHost: x\r\n\r\n")
        # The Host header is the URL's, not the client's: no other virtual host behind it.
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(
            f"hello from allowed.test:{origin}".encode()
        )
        cases = {
            f"GET http://other.test:{origin}/hello HTTP/1.1\r\n\r\n": b"not in network.allow",
            f"GET http://127.0.0.1:{origin}/hello HTTP/1.1\r\n\r\n": b"not in network.allow",
            # allowed by name, but not pinned: it resolves to this machine, which is refused
            f"GET http://localhost:{origin}/hello HTTP/1.1\r\n\r\n": b"no public address",
            f"CONNECT other.test:{origin} HTTP/1.1\r\n\r\n": b"not in network.allow",
            # allowed by the task, but the pin opens its address on one port only
            "CONNECT allowed.test:4222 HTTP/1.1\r\n\r\n": b"not pinned for this port",
            "CONNECT allowed.test:\u00b2 HTTP/1.1\r\n\r\n": b"bad port",
            "GET https://allowed.test/ HTTP/1.1\r\n\r\n": b"through CONNECT",
            "NONSENSE\r\n\r\n": b"not an HTTP/1.x proxy request",
        }
        for head, why in cases.items():
            answer = await ask(sock, head)
            assert answer.split(b" ")[1] in (b"403", b"400") and why in answer, (head, answer)
        # A tunnel to an allowed name carries whatever the client speaks.
        tunnel = await ask(
            sock,
            f"CONNECT allowed.test:{origin} HTTP/1.1\r\n\r\n",
            b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        assert tunnel.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200")
        # The proxy does not follow redirects: the client's next request is decided again.
        moved = await ask(sock, f"GET http://allowed.test:{origin}/redirect HTTP/1.1\r\n\r\n")
        assert moved.startswith(b"HTTP/1.1 302") and b"other.test" in moved
        counts = proxy.counts(task)
    finally:
        await proxy.close()
    (allowed,) = counts.allowed
    assert allowed.host == "allowed.test" and allowed.requests == 3 and allowed.bytes > 0
    blocked = {(b.host, b.port): b.count for b in counts.blocked}
    assert blocked == {
        ("other.test", origin): 2,
        ("127.0.0.1", origin): 1,
        ("localhost", origin): 1,
        ("allowed.test", 4222): 1,
    }


async def test_a_task_cannot_use_more_than_its_bytes_and_connections(
    tmp_path: Path, origin: int
) -> None:
    limits = EgressLimits(max_connections=2, max_bytes=256 * 1024)
    proxy = EgressProxy(socket_dir=tmp_path, pins=pins(origin, *PINNED), limits=limits)
    task = ev.new_task_id()
    sock = await proxy.add_task(task, [f"allowed.test:{origin}"])
    try:
        cut = await ask(sock, f"GET http://allowed.test:{origin}/big HTTP/1.1\r\n\r\n")
        assert len(cut) < 512 * 1024  # cut near the cap, not the whole MiB
        after = await ask(sock, f"GET http://allowed.test:{origin}/hello HTTP/1.1\r\n\r\n")
        assert after.startswith(b"HTTP/1.1 403") and b"bytes of egress" in after
        held = [await asyncio.open_unix_connection(str(sock)) for _ in range(2)]
        async with asyncio.timeout(5):
            while proxy.open_connections(task) < 2:  # until the proxy has taken both
                await asyncio.sleep(0.01)
        third = await ask(sock, "GET http://allowed.test/ HTTP/1.1\r\n\r\n")
        assert third.startswith(b"HTTP/1.1 429")
        for _, writer in held:
            writer.close()
    finally:
        await proxy.close()


async def test_a_restarted_proxy_keeps_the_policy_and_the_counts(
    tmp_path: Path, origin: int
) -> None:
    task = ev.new_task_id()
    first = EgressProxy(socket_dir=tmp_path, pins=pins(origin, *PINNED))
    sock = await first.add_task(task, [f"allowed.test:{origin}"])
    await ask(sock, f"GET http://other.test:{origin}/ HTTP/1.1\r\n\r\n")
    await first.close()
    second = EgressProxy(socket_dir=tmp_path, pins=pins(origin, *PINNED))
    assert await second.adopt_existing() == [task]
    try:
        ok = await ask(sock, f"GET http://allowed.test:{origin}/hello HTTP/1.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        assert [(b.host, b.count) for b in second.counts(task).blocked] == [("other.test", 1)]
    finally:
        await second.remove_task(task)
        await second.close()
    assert not sock.exists()


async def test_tls_goes_through_a_tunnel_untouched(tmp_path: Path) -> None:
    """CONNECT, then a TLS handshake with the origin itself: the client verifies the
    origin's certificate for the name it asked for; the proxy only carries bytes."""
    cert, key = self_signed(tmp_path, "secure.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secret hello over {request.scheme}")

    app = web.Application()
    app.router.add_get("/", hello)
    async with serving(app, server_ctx) as port:
        proxy = EgressProxy(socket_dir=tmp_path / "sockets", pins=pins(port, "secure.test"))
        task = ev.new_task_id()
        sock = await proxy.add_task(task, [f"secure.test:{port}"])
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(f"CONNECT secure.test:{port} HTTP/1.1\r\n\r\n".encode())
            assert (
                await reader.readuntil(b"\r\n\r\n")
                == b"HTTP/1.1 200 Connection Established\r\n\r\n"
            )
            client_ctx = ssl.create_default_context(cafile=str(cert))
            await writer.start_tls(client_ctx, server_hostname="secure.test")
            writer.write(b"GET / HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(
                b"secret hello over https"
            )
            assert [(a.host, a.requests) for a in proxy.counts(task).allowed] == [
                ("secure.test", 1)
            ]
        finally:
            await proxy.close()
