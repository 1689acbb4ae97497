"""What the lifecycle reads of a long task: its whole history, or all but its output batches.

A private nats-server; one task with ``--outputs`` batches of ``--line-bytes`` each (the
output cap of 16 MiB is 64 batches of 256 KiB) between its start and a cancel request. Prints
the time to read the whole history (what the lifecycle did on every control event) next to
the read without ``AgentOutput`` (what it does now), medians of ``--runs``.

    .venv/bin/python bench/history_read.py [--outputs 64] [--line-bytes 262000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import events as ev  # noqa: E402
from shared.bus import Bus, StreamSettings, connect  # noqa: E402
from shared.events import WITHOUT_OUTPUT  # noqa: E402
from tests.support.procs import NatsServer  # noqa: E402


async def main_async(outputs: int, line_bytes: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        nats.start()
        try:
            nc = await connect(nats.url, name="bench", auth=nats.auth())
            bus = Bus(nc, StreamSettings(name="BENCH", subject_prefix="bench"))
            await bus.ensure_stream()
            task = ev.new_task_id()
            await bus.publish(
                ev.TaskRequested(
                    event_id=ev.event_id(task, "TaskRequested"),
                    task_id=task,
                    tenant="bench",
                    spec=ev.TaskSpec(prompt="p"),
                )
            )
            for batch in range(outputs):
                await bus.publish(
                    ev.AgentOutput(
                        event_id=ev.event_id(task, "AgentOutput", batch),
                        task_id=task,
                        tenant="bench",
                        batch=batch,
                        lines=["x" * line_bytes],
                    )
                )
            await bus.publish(
                ev.TaskCancelRequested(
                    event_id=ev.event_id(task, "TaskCancelRequested"), task_id=task, tenant="bench"
                )
            )
            subjects = [bus.subject(task, name) for name in WITHOUT_OUTPUT]
            whole, control = [], []
            for _ in range(runs):
                began = time.perf_counter()
                n_whole = len([r async for r in bus.read(bus.task_filter(task))])
                whole.append(time.perf_counter() - began)
                began = time.perf_counter()
                n_control = len([r async for r in bus.read(subjects=subjects)])
                control.append(time.perf_counter() - began)
            await nc.close()
        finally:
            nats.stop()
    size = outputs * line_bytes / 2**20
    print(f"one task, {outputs} output batches ({size:.1f} MiB of output); medians of {runs}")
    print(f"{'read':<32}{'events':>8}{'ms':>10}")
    print(f"{'whole history (before)':<32}{n_whole:>8}{statistics.median(whole) * 1000:>10.1f}")
    now = statistics.median(control) * 1000
    print(f"{'without output (lifecycle now)':<32}{n_control:>8}{now:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outputs", type=int, default=64)
    parser.add_argument("--line-bytes", type=int, default=262_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main_async(args.outputs, args.line_bytes, args.runs))


if __name__ == "__main__":
    main()
