"""Replay to JSON lines: ``sandstream replay --json`` over a stream of many small events.

A private nats-server; ``--tasks`` tasks of a typical short life (requested, sandbox started,
execution started, ``--outputs`` output batches of a few lines, completed, sandbox stopped,
result stored, succeeded) published first. Then, medians of ``--runs``:

- bare: the same stream read with nats-py's ordered consumer, messages counted, not decoded
  (the floor any reader on this client pays);
- sandstream: ``sandstream replay --json`` as a user runs it (a process, stdout to
  /dev/null; its start-up included).

    .venv/bin/python bench/replay.py [--tasks 5000] [--outputs 6] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import events as ev  # noqa: E402
from shared.bus import Bus, StreamSettings, connect  # noqa: E402
from tests.support.procs import NatsServer  # noqa: E402

STREAM = StreamSettings(name="BENCH", subject_prefix="bench")


def life(task: str, outputs: int) -> list[ev.Event]:
    common = {"task_id": task, "tenant": "bench"}
    line = '{"type":"assistant","message":{"content":[{"type":"text","text":"working"}]}}'
    events: list[ev.Event] = [
        ev.TaskRequested(
            event_id=ev.event_id(task, "TaskRequested"), spec=ev.TaskSpec(prompt="p"), **common
        ),
        ev.SandboxStarted(
            event_id=ev.event_id(task, "SandboxStarted"), sandbox="s", image="i", **common
        ),
        ev.ExecutionStarted(event_id=ev.event_id(task, "ExecutionStarted"), sandbox="s", **common),
    ]
    events += [
        ev.AgentOutput(
            event_id=ev.event_id(task, "AgentOutput", n * 3),
            batch=n,
            lines=[line] * 3,
            first_line=n * 3,
            **common,
        )
        for n in range(outputs)
    ]
    events += [
        ev.ExecutionCompleted(
            event_id=ev.event_id(task, "ExecutionEnded"),
            text="done",
            is_error=False,
            exit_code=0,
            **common,
        ),
        ev.SandboxStopped(
            event_id=ev.event_id(task, "SandboxStopped"), sandbox="s", reason="completed", **common
        ),
        ev.ResultStored(
            event_id=ev.event_id(task, "ResultStored"),
            status="succeeded",
            location="file:///r",
            objects=[],
            **common,
        ),
        ev.TaskSucceeded(event_id=ev.terminal_id(task), **common),
    ]
    return events


async def fill(bus: Bus, tasks: int, outputs: int) -> int:
    count = 0
    pending: list[asyncio.Task[object]] = []
    for _ in range(tasks):
        for event in life(ev.new_task_id(), outputs):
            pending.append(asyncio.ensure_future(bus.publish(event)))
            count += 1
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return count


async def bare_read(bus: Bus, expected: int) -> float:
    began = time.perf_counter()
    seen = 0
    done = asyncio.Event()

    async def on_msg(msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= expected:
            done.set()

    sub = await bus.js.subscribe(
        bus.all_filter, cb=on_msg, ordered_consumer=True, stream=STREAM.name
    )
    await done.wait()
    await sub.unsubscribe()
    return time.perf_counter() - began


def cli_read(nats: NatsServer, expected: int) -> float:
    env = dict(
        os.environ,
        **nats.env("reader"),
        SANDSTREAM_STREAM=STREAM.name,
        SANDSTREAM_SUBJECT_PREFIX=STREAM.subject_prefix,
    )
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "replay", "--json"],
        env=env, cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - began
    lines = out.stdout.count(b"\n")
    if lines != expected:
        raise SystemExit(f"replay printed {lines} lines, expected {expected}")
    return wall


async def main_async(tasks: int, outputs: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        try:
            nc = await connect(nats.url, name="bench", auth=nats.auth())
            bus = Bus(nc, STREAM)
            await bus.ensure_stream()
            began = time.perf_counter()
            count = await fill(bus, tasks, outputs)
            filled = time.perf_counter() - began
            bare = [await bare_read(bus, count) for _ in range(runs)]
            await nc.close()
            ours = [cli_read(nats, count) for _ in range(runs)]
        finally:
            nats.stop()
    print(f"{count} events ({tasks} tasks), published in {filled:.1f} s; medians of {runs}")
    for name, walls in (("bare ordered consumer (no decoding)", bare),
                        ("sandstream replay --json (a process)", ours)):  # fmt: skip
        wall = statistics.median(walls)
        print(f"{name:<40}{wall:8.2f} s  {count / wall:10,.0f} events/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--outputs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.tasks, args.outputs, args.runs))


if __name__ == "__main__":
    main()
