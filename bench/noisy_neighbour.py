"""A noisy neighbour: one tenant attacks, another runs ordinary tasks; what does the victim see?

``sandstream up`` with a fake model that answers at once, two tenants. For each attack the
victim runs ``--tasks`` one-reply tasks one after the other while the attacker's task runs,
and the script prints the victim's accept → terminal latency next to the same figure with no
attack, and the peak resident memory (sampled every 50 ms) of the gateway, the executor and
the model proxy during each phase. The attacks, all from real parts:

- ``output flood``: the attacker's agent appends 64 MB to its run's own output file;
- ``proxy flood``: the attacker's agent opens 100 connections to its model socket, each
  sending 1 MB of a body it never finishes;
- ``sse flood``: the attacker opens 60 event streams on its own task and never reads them;
- ``queue flood``: the attacker submits 100 tasks whose agents wait on the model until the
  victim is done, so it runs at its per-tenant cap and queues the rest (more queued requests
  than the lifecycle has request handlers).

    .venv/bin/python bench/noisy_neighbour.py --tasks 5
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.tokens import create_token  # noqa: E402
from tests.e2e.test_noisy_neighbour import (  # noqa: E402
    PROXY_FLOOD,
    peak_rss,
    services_of,
    sse_flood,
)
from tests.e2e.test_up import System, start_up, stop_up  # noqa: E402
from tests.fakes.model import FakeModel, Reply, Text, ToolUse  # noqa: E402

OUTPUT_FLOOD = 'yes \'{"type":"noise"}\' | head -c 64000000 >> /tmp/.sandstream-run/out.jsonl'


async def run_task(
    http: aiohttp.ClientSession, system: System, token: str, body: dict[str, object]
) -> tuple[str, str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    began = time.perf_counter()
    async with http.post(f"{system.url}/v1/tasks", json=body, headers=headers) as r:
        task_id = (await r.json())["task_id"]
    status = "queued"
    while status not in ("succeeded", "failed", "cancelled", "timed_out"):
        async with http.get(f"{system.url}/v1/tasks/{task_id}?wait=60", headers=headers) as r:
            view = await r.json()
            status = view["status"]
    code = (view.get("error") or {}).get("code", "")
    return task_id, f"{status} {code}".strip(), time.perf_counter() - began


async def victim(
    http: aiohttp.ClientSession, system: System, token: str, n: int, tag: str
) -> list[float]:
    took = []
    for i in range(n):
        _, status, seconds = await run_task(
            http, system, token, {"prompt": f"victim {tag} {i}", "timeout_s": 120}
        )
        if status != "succeeded":
            raise SystemExit(f"a victim task ended {status}")
        took.append(seconds)
    return took


async def main_async(tasks: int, keep: bool) -> None:
    async with FakeModel() as fake:
        fake.script([Text("ok")])
        fake.script(match="attack: output", replies=[ToolUse.bash(OUTPUT_FLOOD), Text("flooded")])
        fake.script(match="attack: proxy", replies=[ToolUse.bash(PROXY_FLOOD), Text("done")])
        hold = asyncio.Event()  # a long task for the SSE flood, with some history
        fake.script(
            match="attack: sse",
            replies=[ToolUse.bash("seq 200000"), Reply(Text("held"), hold=hold)],
        )
        queued = asyncio.Event()  # the queue flood's tasks run until the victim is done
        fake.script(match="attack: queue", replies=[Reply(Text("queued"), hold=queued)])
        tmp = Path(tempfile.mkdtemp(prefix="sandstream-noisy-"))
        print(f"logs and data in {tmp} (removed at the end unless --keep)", flush=True)
        system = await start_up(tmp, fake)
        try:
            rows = await phases(system, fake, hold, queued, tasks)
        finally:
            stop_up(system)
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(rows[0][1])
    print(
        f"{'phase':<32}{'victim p50':>12}{'vs alone':>10}   "
        "peak RSS MiB (gateway / executor / model proxy)   attacker's task"
    )
    for name, took, peaks, outcome in rows:
        p50 = statistics.median(took)
        mem = " / ".join(f"{peaks.get(k, 0):.0f}" for k in ("gateway", "executor", "modelproxy"))
        print(f"{name:<32}{p50 * 1000:>9.0f} ms{p50 / base:>9.2f}x   {mem:<48}{outcome}")


Row = tuple[str, list[float], dict[str, float], str]


async def phases(
    system: System, fake: FakeModel, hold: asyncio.Event, queued: asyncio.Event, tasks: int
) -> list[Row]:
    tokens = system.data_dir / "tokens"
    victim_token = create_token(tokens, "victim")
    attacker = create_token(tokens, "attacker")
    watched = ("gateway", "executor", "modelproxy")
    pids = {k: v for k, v in services_of(system.proc.pid).items() if k in watched}
    rows: list[Row] = []
    # No connection limit: the queue flood holds 100 long polls while the victim submits.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await victim(http, system, victim_token, 1, "warm-up")
        async with peak_rss(pids) as peaks:
            took = await victim(http, system, victim_token, tasks, "alone")
        rows.append(("no attack", took, dict(peaks), ""))
        for name, prompt in (("output flood", "attack: output"), ("proxy flood", "attack: proxy")):
            body = {"prompt": prompt, "allowed_tools": ["Bash"], "timeout_s": 300}
            async with peak_rss(pids) as peaks:
                attack = asyncio.create_task(run_task(http, system, attacker, body))
                took = await victim(http, system, victim_token, tasks, name)
                _, outcome, _ = await attack
            rows.append((name, took, dict(peaks), outcome))
        body = {"prompt": "attack: sse", "allowed_tools": ["Bash"], "timeout_s": 300}
        attack = asyncio.create_task(run_task(http, system, attacker, body))
        await fake.wait_for(
            lambda: any(
                "attack: sse" in (r.prompt or "") and r.reply_index == 1
                for r in fake.main_requests()
            ),
            120,
        )
        views = await list_tasks(http, system, attacker)
        sse_task = next(str(t["task_id"]) for t in views if t["status"] == "running")
        async with peak_rss(pids) as peaks:
            writers = await sse_flood(system, attacker, sse_task, 60)
            took = await victim(http, system, victim_token, tasks, "sse")
            for writer in writers:
                writer.close()
        hold.set()
        _, outcome, _ = await attack
        rows.append(("sse flood (60 unread streams)", took, dict(peaks), outcome))
        body = {"prompt": "attack: queue", "timeout_s": 600}
        async with peak_rss(pids) as peaks:
            flood = [
                asyncio.create_task(run_task(http, system, attacker, body)) for _ in range(100)
            ]
            await fake.wait_for(
                lambda: sum("attack: queue" in (r.prompt or "") for r in fake.main_requests()) >= 4,
                120,
            )
            took = await victim(http, system, victim_token, tasks, "queue")
            queued.set()
            ends = await asyncio.gather(*flood)
        outcomes = sorted({outcome for _, outcome, _ in ends})
        rows.append(("queue flood (100 tasks)", took, dict(peaks), ", ".join(outcomes)))
    return rows


async def list_tasks(
    http: aiohttp.ClientSession, system: System, token: str
) -> list[dict[str, object]]:
    async with http.get(
        f"{system.url}/v1/tasks", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        tasks: list[dict[str, object]] = (await r.json())["tasks"]
        return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep up's data dir and log")
    args = parser.parse_args()
    asyncio.run(main_async(args.tasks, args.keep))


if __name__ == "__main__":
    main()
