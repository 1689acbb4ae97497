"""Gateway accept throughput and latency, next to a bare aiohttp server: figures, not assertions.

Starts a private nats-server and one gateway process (``python -m services.gateway``) on
loopback, with the tenant's rate and queue limits out of the way, and loads it: with ``wrk``
(Debian's package; 2 threads, ``--concurrency`` connections, ``--seconds``) when it is on the
PATH, else from this process (``--requests`` submissions, ``--concurrency`` in flight). Then
the floor, loaded the same way: one aiohttp process that reads the same request and answers
``202`` with a body of the same size (no token, no validation, no event log). Prints
submissions per second and p50/p90/p99 accept latency of both.

    .venv/bin/python bench/gateway_load.py [--concurrency 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.tokens import create_token  # noqa: E402
from tests.support.procs import NatsServer, free_port, wait_for_port  # noqa: E402

BODY = {"prompt": "benchmark task", "timeout_s": 60}
BARE_APP = """
import sys
from aiohttp import web

ANSWER = b'{"task_id":"t_aaaaaaaaaaaaaaaaaaaa","status":"queued","links":{"self":"/v1/tasks/t_a"}}'

async def accept(request):
    await request.read()
    return web.Response(body=ANSWER, status=202, content_type="application/json")

app = web.Application()
app.router.add_post("/v1/tasks", accept)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


class Figures:
    def __init__(self, rate: float, p50: float, p90: float, p99: float) -> None:
        self.rate, self.p50, self.p90, self.p99 = rate, p50, p90, p99

    def line(self, what: str) -> str:
        return (
            f"{what:<22} {self.rate:8,.0f} submissions/s   latency ms p50 {self.p50:.2f}  "
            f"p90 {self.p90:.2f}  p99 {self.p99:.2f}"
        )


async def load(url: str, headers: dict[str, str], requests: int, concurrency: int) -> Figures:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    began = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                sent = time.perf_counter()
                async with session.post(f"{url}/v1/tasks", json=BODY, headers=headers) as r:
                    await r.read()
                    if r.status != 202:
                        raise RuntimeError(f"unexpected {r.status}")
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return Figures(len(latencies) / wall, pct(0.50), pct(0.90), pct(0.99))


def with_wrk(url: str, headers: dict[str, str], connections: int, seconds: int) -> Figures:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "submit.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            """wrk.body = '{"prompt":"benchmark task","timeout_s":60}'\n"""
            'wrk.headers["Content-Type"] = "application/json"\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
        )
        argv = ["wrk", "-t2", f"-c{connections}", "--latency", "-s", str(script), url + "/v1/tasks"]
        subprocess.run([*argv[:3], "-d2s", *argv[3:]], capture_output=True, check=True)  # warm
        out = subprocess.run(
            [*argv[:3], f"-d{seconds}s", *argv[3:]], capture_output=True, text=True, check=True
        ).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        raise SystemExit(f"wrk saw errors:\n{out}")

    def ms(percent: int) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert found, out
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate, out
    return Figures(float(rate.group(1)), ms(50), ms(90), ms(99))


async def ready(url: str) -> None:
    """Wait (up to 30 s) for the gateway's ``/readyz``: connected, its view of tasks built."""
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise SystemExit("the gateway did not become ready in 30 s")


@contextmanager
def running(
    argv: list[str], port: int, env: dict[str, str] | None = None, *, readyz: bool = False
) -> Iterator[str]:
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        if readyz:
            asyncio.run(ready(url))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()

    def measure(url: str, headers: dict[str, str]) -> Figures:
        if shutil.which("wrk"):
            return with_wrk(url, headers, args.concurrency, args.seconds)
        asyncio.run(load(url, headers, 200, 8))  # warm-up
        return asyncio.run(load(url, headers, args.requests, args.concurrency))

    how = (
        f"wrk, 2 threads, {args.concurrency} connections, {args.seconds} s"
        if shutil.which("wrk")
        else f"from this process (`apt-get install wrk` for wrk): {args.requests} requests, "
        f"{args.concurrency} in flight"
    )
    print(f"POST /v1/tasks, {how}; one server process each")
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        try:
            port = free_port()
            tokens = Path(tmp) / "tokens"
            headers = {"Authorization": f"Bearer {create_token(tokens, 'bench')}"}
            env = dict(
                os.environ,
                **nats.env("gateway"),
                SANDSTREAM_TOKENS_FILE=str(tokens),
                SANDSTREAM_PORT=str(port),
                SANDSTREAM_DATA_DIR=tmp,
                SANDSTREAM_RATE_PER_TENANT="1000000",
                SANDSTREAM_MAX_QUEUED_PER_TENANT="1000000000",
            )
            gateway_argv = [sys.executable, "-m", "services.gateway"]
            with running(gateway_argv, port, env, readyz=True) as url:
                gateway = measure(url, headers)
        finally:
            nats.stop()
    port = free_port()
    with running([sys.executable, "-c", BARE_APP, str(port)], port) as url:
        bare = measure(url, {})
    print(bare.line("bare aiohttp"))
    print(gateway.line("sandstream gateway"))
    print(f"the gateway takes {gateway.rate / bare.rate:.2f}× the bare server's rate")


if __name__ == "__main__":
    main()
