"""Gateway accept throughput and latency: figures, not assertions.

Starts a private nats-server and one gateway process (``python -m services.gateway``) on
loopback, with the tenant's rate and queue limits out of the way, then loads it: with ``wrk``
(Debian's package; 2 threads, ``--concurrency`` connections, ``--seconds``) when it is on the
PATH, else from this process (``--requests`` submissions, ``--concurrency`` in flight). Prints
submissions per second and p50/p90/p99 accept latency.

    .venv/bin/python bench/gateway_load.py [--concurrency 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.tokens import create_token  # noqa: E402
from tests.support.procs import NatsServer, free_port, wait_for_port  # noqa: E402


async def load(url: str, token: str, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    body = {"prompt": "benchmark task", "timeout_s": 60}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                began = time.perf_counter()
                async with session.post(f"{url}/v1/tasks", json=body, headers=headers) as r:
                    await r.read()
                    if r.status != 202:
                        raise RuntimeError(f"unexpected {r.status}")
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def with_wrk(url: str, token: str, connections: int, seconds: int, tmp: str) -> str:
    script = Path(tmp) / "submit.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        """wrk.body = '{"prompt":"benchmark task","timeout_s":60}'\n"""
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    argv = ["wrk", "-t2", f"-c{connections}", "--latency", "-s", str(script), f"{url}/v1/tasks"]
    subprocess.run([*argv[:3], "-d2s", *argv[3:]], capture_output=True, check=True)  # warm-up
    done = subprocess.run([*argv[:3], f"-d{seconds}s", *argv[3:]], capture_output=True, text=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    wrk = shutil.which("wrk")

    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        port = free_port()
        tokens = Path(tmp) / "tokens"
        token = create_token(tokens, "bench")
        env = dict(
            os.environ,
            **nats.env("gateway"),
            SANDSTREAM_TOKENS_FILE=str(tokens),
            SANDSTREAM_PORT=str(port),
            SANDSTREAM_DATA_DIR=tmp,
            SANDSTREAM_RATE_PER_TENANT="1000000",
            SANDSTREAM_MAX_QUEUED_PER_TENANT="1000000000",
        )
        gateway = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            url = f"http://127.0.0.1:{port}"
            if wrk:
                print(with_wrk(url, token, args.concurrency, args.seconds, tmp))
                return
            print("(wrk is not installed: `apt-get install wrk`; loading from this process)")
            asyncio.run(load(url, token, 200, 8))  # warm-up
            began = time.perf_counter()
            lat = asyncio.run(load(url, token, args.requests, args.concurrency))
            wall = time.perf_counter() - began
        finally:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
            nats.stop()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    print(f"requests      {len(lat)} (concurrency {args.concurrency}, one gateway process)")
    print(f"throughput    {len(lat) / wall:,.0f} submissions/s")
    print(f"latency ms    p50 {pct(0.50):.2f}  p90 {pct(0.90):.2f}  p99 {pct(0.99):.2f}")
    print(f"              mean {statistics.fmean(lat) * 1000:.2f}  max {lat[-1] * 1000:.2f}")


if __name__ == "__main__":
    main()
