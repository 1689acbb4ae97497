"""The task-state fold over long tasks: total time and time per event, which stays flat when
each event costs O(1) (it grew with the task's length while the fold copied a set of every
event id it had seen: 8,000 events took 0.40 s, 32,000 took 11.6 s on a 2-core machine).

    python bench/fold.py [--events 2000 8000 32000]
"""

from __future__ import annotations

import argparse
import time

from shared import events as ev
from shared.state import fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, nargs="+", default=[2000, 8000, 32000])
    args = parser.parse_args()
    task = ev.new_task_id()
    request = ev.TaskRequested(
        event_id=ev.event_id(task, "TaskRequested"),
        task_id=task,
        tenant="bench",
        spec=ev.TaskSpec(prompt="p"),
    )
    print(f"{'events':>7} {'fold (s)':>9} {'per event (µs)':>15}")
    for n in args.events:
        batches = [
            ev.AgentOutput(
                event_id=ev.event_id(task, "AgentOutput", b),
                task_id=task,
                tenant="bench",
                batch=b,
                lines=[],
            )
            for b in range(n)
        ]
        started = time.perf_counter()
        fold([request, *batches])
        took = time.perf_counter() - started
        print(f"{n:>7} {took:>9.4f} {took / n * 1e6:>15.2f}")


if __name__ == "__main__":
    main()
