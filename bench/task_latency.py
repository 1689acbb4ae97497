"""One-reply task latency through the whole system, next to a bare hardened `docker run`.

``sandstream up`` with a scripted fake model that answers at once, and ``--tasks`` sequential
one-reply tasks, each paired with one bare run of the same image and CLI just before it (the
floor, ``bench/bare_run.py``'s: a fresh hardened container without the pool, ``docker exec``
into a running one with it), so that both meet the machine as it is at that moment (this
host's speed drifts by ±10 % over minutes). For each task it reports HTTP accept → terminal
status (client side, ``?wait``), and from the event log ``TaskRequested`` →
``SandboxStarted`` → ``ExecutionCompleted`` → terminal. Each task is sent to a settled system
(the previous task's sandbox removed, the warm pool refilled), as a task that is not queued
behind others meets it: the bare runs too have the machine to themselves.

    .venv/bin/python bench/task_latency.py --tasks 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import events as ev  # noqa: E402
from shared.bus import Bus, NatsAuth, connect  # noqa: E402
from shared.identities import seed_path  # noqa: E402
from shared.sandbox import LABEL_MANAGED, LABEL_POOL  # noqa: E402
from shared.settings import DEFAULT_IMAGE  # noqa: E402
from tests.fakes.model import FakeModel, Text  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bare_run import Floor  # noqa: E402


async def settled(pool: int) -> None:
    """Wait (at most 30 s) until the engine holds the warm pool's sandboxes, running, and no other:
    the last task's sandbox removed and the pool refilled."""
    docker = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else "docker"
    for _ in range(600):
        counts = []
        for which in (["-a", f"label={LABEL_MANAGED}=1"], [f"label={LABEL_POOL}=1"]):
            proc = await asyncio.create_subprocess_exec(
                docker, "ps", "-q", "--filter", which[-1], *which[:-1],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await proc.communicate()
            counts.append(len(out.split()))
        if counts == [pool, pool]:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the engine did not settle at {pool} pool sandboxes (saw {counts})")


def median_ms(values: list[float]) -> str:
    low, mid, high = (x * 1000 for x in (min(values), statistics.median(values), max(values)))
    return f"{mid:7.0f} ms  (min {low:.0f}, max {high:.0f})"


STAGES = (
    ("requested→sandbox", "TaskRequested", "SandboxStarted"),
    ("sandbox→execution", "SandboxStarted", "ExecutionStarted"),
    ("execution→output", "ExecutionStarted", "AgentOutput"),
    ("output→completed", "AgentOutput", "ExecutionCompleted"),
    ("completed→terminal", "ExecutionCompleted", "TaskSucceeded"),
    ("requested→terminal", "TaskRequested", "TaskSucceeded"),
)


async def through_the_system(tasks: int, pool: int, floor: Floor) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"bare": [], "accept→terminal": []}
    figures.update({name: [] for name, _, _ in STAGES})
    async with FakeModel() as fake:
        fake.script([Text("ok")])
        with tempfile.TemporaryDirectory() as tmp:
            port, nats_port = free_port(), free_port()
            env = dict(
                os.environ,
                SANDSTREAM_MODEL_UPSTREAM=fake.url,
                ANTHROPIC_API_KEY="bench-key",
                SANDSTREAM_WARM_POOL_SIZE=str(pool),
            )
            env.pop("SANDSTREAM_NATS_URL", None)
            up = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "up", "--data-dir", tmp,
                 "--port", str(port), "--nats-port", str(nats_port)],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                url = f"http://127.0.0.1:{port}"
                token_file = Path(tmp) / "dev-token"
                async with aiohttp.ClientSession() as http:
                    for _ in range(300):
                        try:
                            async with http.get(f"{url}/readyz") as r:
                                if r.status == 200 and token_file.exists():
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)
                    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                    ids = []
                    for i in range(tasks + 1):  # the first one warms up the engine and caches
                        bare_ms = await asyncio.to_thread(
                            floor.exec_once if pool else floor.run_once
                        )
                        await settled(pool)
                        began = time.perf_counter()
                        body = {"prompt": f"say ok ({i})", "timeout_s": 120}
                        async with http.post(f"{url}/v1/tasks", json=body, headers=headers) as r:
                            task_id = (await r.json())["task_id"]
                        async with http.get(
                            f"{url}/v1/tasks/{task_id}?wait=60", headers=headers
                        ) as r:
                            status = (await r.json())["status"]
                        if status != "succeeded":
                            raise SystemExit(f"task {task_id} ended {status}")
                        if i:
                            figures["accept→terminal"].append(time.perf_counter() - began)
                            figures["bare"].append(bare_ms / 1000)
                            ids.append(task_id)
                nc = await connect(
                    f"nats://127.0.0.1:{nats_port}",
                    name="bench",
                    auth=NatsAuth(nkey=seed_path(Path(tmp) / "nats", "reader")),
                )
                bus = Bus(nc)
                for task_id in ids:
                    at: dict[str, datetime] = {}
                    async for r in bus.read(bus.task_filter(task_id)):
                        at.setdefault(ev.type_name(type(r.event)), r.event.at)  # the first
                    for name, since, until in STAGES:
                        figures[name].append((at[until] - at[since]).total_seconds())
                await nc.close()
            finally:
                up.send_signal(signal.SIGINT)
                up.wait(60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument(
        "--pool", type=int, nargs="+", default=[0, 2], help="warm pool sizes to run with"
    )
    args = parser.parse_args()
    floor = Floor(image=os.environ.get("SANDSTREAM_SANDBOX_IMAGE") or DEFAULT_IMAGE)
    try:
        for pool in args.pool:
            figures = asyncio.run(through_the_system(args.tasks, pool, floor))
            what = "docker exec (running container)" if pool else "docker run (fresh container)"
            system, bare = figures["accept→terminal"], figures["bare"]
            ratio = statistics.median(system) / statistics.median(bare)
            pairs = statistics.median(s / b for s, b in zip(system, bare, strict=True))
            print(f"sandstream, warm pool {pool}: accept→terminal {ratio:.2f}× bare {what}")
            print(f"  (pair by pair, the median ratio: {pairs:.2f}×)")
            for name, values in figures.items():
                print(f"  {name:<22} {median_ms(values)}")
    finally:
        floor.close()


if __name__ == "__main__":
    main()
