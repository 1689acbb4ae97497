"""The egress proxy's cost: a large download and small requests, through it and directly.

A local HTTP server (aiohttp) serves ``--mb`` MB and a tiny page. The same client code reads
them straight from the server (the bare baseline) and through a task's egress socket (a
``GET http://name/…`` to the proxy, the name pinned to 127.0.0.1), and prints the throughput of
the download (median of ``--runs``) and the median time of one small request (of
``--requests``), next to each other. No Docker: the sandbox's socat bridge is not included.

    .venv/bin/python bench/egress.py [--mb 100] [--runs 3] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.modelproxy.egress import EgressLimits, EgressProxy  # noqa: E402
from shared import events as ev  # noqa: E402
from shared.egress import parse_pins  # noqa: E402
from tests.support.serve import serving  # noqa: E402

CHUNK = 1 << 20


async def fetch(open_conn: object, request: bytes) -> tuple[int, float]:
    """Send ``request``, read the whole answer; (bytes, seconds)."""
    began = time.perf_counter()
    reader, writer = await open_conn()  # type: ignore[operator]
    writer.write(request)
    await writer.drain()
    total = 0
    while chunk := await reader.read(CHUNK):
        total += len(chunk)
    writer.close()
    return total, time.perf_counter() - began


async def main_async(mb: int, runs: int, requests: int) -> None:
    payload = b"x" * (mb << 20)

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=payload)

    async def tiny(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/tiny", tiny)
    async with serving(app) as port:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            proxy = EgressProxy(
                socket_dir=Path(tmp),
                pins=parse_pins(f"mirror.test=127.0.0.1:{port}"),
                limits=EgressLimits(max_bytes=1 << 40, max_connections=64),
            )
            task = ev.new_task_id()
            sock = await proxy.add_task(task, [f"mirror.test:{port}"])

            def direct() -> object:
                return asyncio.open_connection("127.0.0.1", port)

            def proxied() -> object:
                return asyncio.open_unix_connection(str(sock))

            ways = {
                "direct": (direct, "/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                "egress proxy": (
                    proxied,
                    f"http://mirror.test:{port}/{{path}} HTTP/1.1\r\nHost: x\r\n\r\n",
                ),
            }
            print(f"{'path':>14} {f'{mb} MB download':>18} {'small request p50':>18}")
            for name, (opener, target) in ways.items():
                speeds, latencies = [], []
                for _ in range(runs):
                    got, seconds = await fetch(
                        opener, ("GET " + target.format(path="big")).encode()
                    )
                    assert got >= len(payload), got
                    speeds.append(got / seconds / (1 << 20))
                for _ in range(requests):
                    _, seconds = await fetch(opener, ("GET " + target.format(path="tiny")).encode())
                    latencies.append(seconds * 1000)
                print(
                    f"{name:>14} {statistics.median(speeds):>13.0f} MB/s"
                    f" {statistics.median(latencies):>15.2f} ms"
                )
            await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main_async(args.mb, args.runs, args.requests))


if __name__ == "__main__":
    main()
