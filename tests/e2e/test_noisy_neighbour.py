"""One tenant attacks every way at once; another tenant's tasks still run to the end.

``sandstream up`` with the real CLI in real sandboxes and a fake model. The attacker floods
its output (64 MB into its run's own output file), floods its model socket (100 connections
sending bodies they never finish), queues more tasks than the lifecycle has request handlers,
and opens event streams it never reads. Its model replies are held, so every attack is still
in flight when the victim's tasks end: that ordering, not a timing, is what is asserted, with
the peak memory of the services that take the load. The latencies are bench/noisy_neighbour.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.tokens import create_token
from tests.e2e.test_up import System, children_of, start_up, stop_up
from tests.fakes.model import FakeModel, Reply, Text, ToolUse

pytestmark = [pytest.mark.docker, pytest.mark.slow]

OUTPUT_FLOOD = (
    "yes \"$(head -c 8000 /dev/zero | tr '\\0' x)\" | head -c 64000000"
    " >> /tmp/.sandstream-run/out.jsonl"
)
PROXY_FLOOD = (  # bash only (the image has no other interpreter): 100 connections at once
    "a=$(head -c 1000000 /dev/zero | tr '\\0' a); for i in $(seq 100); do ("
    "exec 3<>/dev/tcp/127.0.0.1/4000 || exit; echo c >>/tmp/flood; printf 'POST /v1/messages "
    'HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 8000000\\r\\n\\r\\n%s\' "$a" >&3; '
    "exec sleep 20) >/dev/null 2>&1 & done; sleep 5; echo connected=$(wc -l </tmp/flood)"
)
QUEUED = 80  # more than the lifecycle's 64 request handlers
STREAMS = 40
RSS_BOUND_MIB = 160  # ~50 at rest; a buffered flood alone would be 64+


def flood_connections(fake: FakeModel) -> int | None:
    """How many connections the proxy flood made, as its tool result told the model."""
    for request in fake.main_requests():
        if found := re.search(r"connected=(\d+)", json.dumps(request.body)):
            return int(found.group(1))
    return None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def services_of(up_pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for child in children_of(up_pid):
        for arg in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
            if arg.startswith(b"services."):
                found[arg.decode().removeprefix("services.")] = child
    return found


@contextlib.asynccontextmanager
async def peak_rss(pids: dict[str, int]) -> AsyncIterator[dict[str, float]]:
    peaks = dict.fromkeys(pids, 0.0)

    async def sample() -> None:
        while True:
            for name, pid in pids.items():
                with contextlib.suppress(OSError):
                    peaks[name] = max(peaks[name], rss_mib(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield peaks
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def sse_flood(system: System, token: str, task_id: str, n: int) -> list[asyncio.StreamWriter]:
    """``n`` event streams of ``task_id`` whose responses are never read."""
    host, port = system.url.removeprefix("http://").split(":")
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        writers.append(writer)
    return writers


async def submit(http: aiohttp.ClientSession, up: System, token: str, body: object) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{up.url}/v1/tasks", json=body, headers=headers) as r:
        assert r.status == 202, await r.text()
        task_id: str = (await r.json())["task_id"]
        return task_id


async def view(
    http: aiohttp.ClientSession, up: System, token: str, task_id: str, wait: int = 0
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{up.url}/v1/tasks/{task_id}?wait={wait}", headers=headers) as r:
        found: dict[str, Any] = await r.json()
        return found


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[tuple[System, FakeModel, asyncio.Event]]:
    async with FakeModel() as fake:
        hold = asyncio.Event()  # every attacker's last reply waits for it
        fake.script([Text("victim ok")], match="victim")
        for name, command in (("output", OUTPUT_FLOOD), ("proxy", PROXY_FLOOD)):
            replies: list[Reply | ToolUse] = [ToolUse.bash(command), Reply(Text(name), hold=hold)]
            fake.script(match=f"attack: {name}", replies=replies)
        fake.script(match="attack: queue", replies=[Reply(Text("q"), hold=hold)])
        system = await start_up(tmp_path, fake)
        try:
            yield system, fake, hold
        finally:
            hold.set()
            stop_up(system)


async def test_a_tenant_attacking_every_way_at_once_slows_only_itself(
    up: tuple[System, FakeModel, asyncio.Event],
) -> None:
    system, fake, hold = up
    tokens = system.data_dir / "tokens"
    victim, attacker = create_token(tokens, "victim"), create_token(tokens, "attacker")
    pids = services_of(system.proc.pid)
    assert {"gateway", "executor", "lifecycle", "modelproxy"} <= set(pids), pids
    bash = {"allowed_tools": ["Bash"], "timeout_s": 600}
    async with aiohttp.ClientSession() as http, peak_rss(pids) as peaks:
        flood = await submit(http, system, attacker, {"prompt": "attack: output", **bash})
        proxy = await submit(http, system, attacker, {"prompt": "attack: proxy", **bash})
        await fake.wait_for(lambda: fake.conversations_matching("attack: proxy") == 1, 60)
        queued = await asyncio.gather(
            *(
                submit(http, system, attacker, {"prompt": f"attack: queue {i}", "timeout_s": 600})
                for i in range(QUEUED)
            )
        )
        streams = await sse_flood(system, attacker, proxy, STREAMS)

        for i in range(3):
            body = {"prompt": f"victim {i}", "timeout_s": 60}
            task_id = await submit(http, system, victim, body)
            result = await view(http, system, victim, task_id)
            # A bound, not a timing: a task never read by the lifecycle stays queued forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(90):
                    while result["status"] in ("queued", "starting", "running", "storing"):
                        result = await view(http, system, victim, task_id, wait=30)
            assert result["status"] == "succeeded", result
        # Every attack was still in flight: its held replies have not been released.
        assert not hold.is_set()
        proxy_view = await view(http, system, attacker, proxy)
        assert proxy_view["status"] == "running", proxy_view
        # The flood of the model proxy really ran: its tool result, sent to the model, counts
        # the connections it made.
        await fake.wait_for(lambda: flood_connections(fake) is not None, 60)
        assert (flood_connections(fake) or 0) >= 50
        states = [(await view(http, system, attacker, t))["status"] for t in queued]
        assert states.count("queued") >= QUEUED - 4, states  # the attacker at its cap of 4
        flood_view = await view(http, system, attacker, flood)
        for writer in streams:
            writer.close()
    print(
        {name: round(mib) for name, mib in peaks.items()},
        flood_view["status"],
        flood_connections(fake),
    )
    for name in ("gateway", "executor", "lifecycle", "modelproxy", "storage"):
        assert 0 < peaks[name] < RSS_BOUND_MIB, peaks
