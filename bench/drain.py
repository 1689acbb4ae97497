"""A queue drains: ``--tasks`` one-reply tasks submitted at once, run to the end.

In one run: the floor, ``bench/bare_run.py --parallel`` (fresh hardened ``docker run`` of the
CLI, as many at a time as Sandstream runs tasks: runs per second); then ``sandstream up``
(warm pool 2, ``SANDSTREAM_MAX_CONCURRENT`` as given, a fake model that answers at once) and
the tasks, submitted as fast as the gateway takes them. It prints the submission time, the
drain rate (tasks ended per second, from the first to the last end) next to the floor's rate,
and each service's resident memory: before the submissions, at its peak, and at the end.

    .venv/bin/python bench/drain.py [--tasks 1000] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.test_noisy_neighbour import rss_mib, services_of  # noqa: E402
from tests.e2e.test_up import start_up, stop_up  # noqa: E402
from tests.fakes.model import FakeModel, Text  # noqa: E402

ENDED = ("succeeded", "failed", "cancelled", "timed_out")


async def ended(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    counts = dict.fromkeys(ENDED, 0)
    for status, count in re.findall(r'^sandstream_tasks\{status="(\w+)"\} (\d+)$', text, re.M):
        if status in counts:
            counts[status] = int(count)
    return counts


async def through_the_system(tasks: int, concurrent: int) -> dict[str, object]:
    async with FakeModel() as fake:
        fake.script([Text("ok")])
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                "SANDSTREAM_MAX_CONCURRENT": str(concurrent),
                "SANDSTREAM_MAX_PER_TENANT": str(concurrent),
                "SANDSTREAM_RATE_PER_TENANT": "1000000",
                "SANDSTREAM_MAX_QUEUED_PER_TENANT": str(tasks + 10),
                "SANDSTREAM_WARM_POOL_SIZE": "2",
            }
            up = await start_up(Path(tmp), fake, env)
            pids = services_of(up.proc.pid)
            samples: dict[str, list[float]] = {name: [] for name in pids}

            async def sample() -> None:
                while True:
                    for name, pid in pids.items():
                        with contextlib.suppress(OSError):
                            samples[name].append(rss_mib(pid))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            try:
                async with aiohttp.ClientSession() as http:
                    await asyncio.sleep(2)  # the pool fills; the first samples are the idle ones
                    limit = asyncio.Semaphore(32)

                    async def submit(i: int) -> None:
                        body = {"prompt": f"say ok ({i})", "timeout_s": 3600}
                        async with (
                            limit,
                            http.post(f"{up.url}/v1/tasks", json=body, headers=up.headers()) as r,
                        ):
                            if r.status != 202:
                                raise SystemExit(f"submission {i}: {r.status} {await r.text()}")

                    began = time.perf_counter()
                    await asyncio.gather(*(submit(i) for i in range(tasks)))
                    submitted = time.perf_counter() - began
                    first_end = last_end = None
                    done = 0
                    while done < tasks:
                        counts = await ended(http, up.url)
                        now = time.perf_counter()
                        if sum(counts.values()) > done:
                            done = sum(counts.values())
                            first_end = first_end or now
                            last_end = now
                        await asyncio.sleep(0.25)
                    await asyncio.sleep(2)  # settled
            finally:
                sampler.cancel()
                stop_up(up)
            assert first_end is not None and last_end is not None
            return {
                "submitted_s": submitted,
                "rate": (tasks - 1) / max(last_end - first_end, 1e-9),
                "counts": counts,
                "rss": {
                    name: (values[3] if len(values) > 3 else 0.0, max(values), values[-1])
                    for name, values in samples.items()
                    if values
                },
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    bare = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_run.py"), "-n", "1",
         "--parallel", str(args.concurrent), "--rate-runs", str(3 * args.concurrent)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    floor = json.loads(bare.stdout.strip().splitlines()[-1])["rate"]["runs_per_s"]
    figures = asyncio.run(through_the_system(args.tasks, args.concurrent))
    rate = float(figures["rate"])  # type: ignore[arg-type]
    print(f"bare docker run, {args.concurrent} at a time      {floor:6.2f} runs/s")
    print(f"sandstream, {args.tasks} tasks queued at once  {rate:6.2f} tasks/s "
          f"({rate / floor:.2f}× bare); submitted in {figures['submitted_s']:.1f} s; "
          f"ended {figures['counts']}")  # fmt: skip
    print("resident memory, MiB           idle    peak     end")
    for name, (idle, peak, end) in figures["rss"].items():  # type: ignore[attr-defined]
        print(f"  {name:<26} {idle:7.1f} {peak:7.1f} {end:7.1f}")


if __name__ == "__main__":
    main()
