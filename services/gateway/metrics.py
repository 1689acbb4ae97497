"""``GET /metrics``: Prometheus text exposition, counted in process (no client library).

Besides the gateway's own answers, the stages of every task, timed from the event log: the
gateway reads every event anyway (its task view), and each event carries the time it was
made (``at``), so one place sees the whole path of a task across the services. Stages count
from this gateway's start (the log it reads at start-up included).
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from services.gateway.projection import Projection
from shared import events as ev

BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 1800.0)  # fmt: skip
MAX_OPEN: Final = 100_000
"""Tasks whose stage times are kept at once (their stages so far; dropped at their end)."""

STAGES: Final = {
    "queued": "TaskRequested to SandboxStarted: admission and the sandbox made ready",
    "preparing": "SandboxStarted to ExecutionStarted: the workspace and the agent's start",
    "first_output": "ExecutionStarted to the agent's first output",
    "running": "ExecutionStarted to the run's end (ExecutionCompleted or ExecutionFailed)",
    "finishing": "the run's end to the task's terminal event (result stored, sandbox removed)",
    "total": "TaskRequested to the task's terminal event",
}


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus reads them."""

    def __init__(self, buckets: Sequence[float] = BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {self.sum:.6f}")
        out.append(f"{name}_count{braces} {self.count}")
        return out


class StageTimes:
    """Per-stage durations of tasks, from the times their events were made."""

    def __init__(self) -> None:
        self.histograms = {stage: Histogram() for stage in STAGES}
        self._open: OrderedDict[str, dict[str, datetime]] = OrderedDict()

    def observe(self, event: ev.AnyEvent) -> None:
        task = event.task_id
        if isinstance(event, ev.TaskRequested):
            self._open[task] = {"requested": event.at}
            if len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)
            return
        seen = self._open.get(task)
        if seen is None:
            return
        if isinstance(event, ev.SandboxStarted):
            self._stage(seen, "queued", "requested", "sandbox", event.at)
        elif isinstance(event, ev.ExecutionStarted):
            self._stage(seen, "preparing", "sandbox", "execution", event.at)
        elif isinstance(event, ev.AgentOutput):
            self._stage(seen, "first_output", "execution", "output", event.at)
        elif isinstance(event, ev.ExecutionCompleted | ev.ExecutionFailed):
            self._stage(seen, "running", "execution", "ended", event.at)
        elif isinstance(event, ev.TERMINAL_TYPES):
            self._stage(seen, "finishing", "ended", "terminal", event.at)
            self._stage(seen, "total", "requested", "total", event.at)
            del self._open[task]  # its repeats find nothing: counted once

    def _stage(
        self, seen: dict[str, datetime], stage: str, since: str, mark: str, at: datetime
    ) -> None:
        """Count ``stage`` when ``mark`` is first seen (a repeated event counts once), from
        ``since`` if that was seen (a task cancelled while queued never ran)."""
        if mark in seen:
            return
        seen[mark] = at
        if (start := seen.get(since)) is not None:
            self.histograms[stage].observe(max(0.0, (at - start).total_seconds()))


class Metrics:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.stages = StageTimes()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.responses[(route, status)] += 1
        histogram = self.latency.get(route)
        if histogram is None:
            histogram = self.latency[route] = Histogram()
        histogram.observe(seconds)


def exposition(m: Metrics, projection: Projection, *, connected: bool) -> str:
    """The metrics in Prometheus' text format."""
    lines = [
        "# HELP sandstream_http_responses_total HTTP responses by route and status.",
        "# TYPE sandstream_http_responses_total counter",
    ]
    for (route, status), count in sorted(m.responses.items()):
        lines.append(
            f'sandstream_http_responses_total{{route="{route}",status="{status}"}} {count}'
        )
    lines += [
        "# HELP sandstream_http_response_seconds Time spent answering requests, by route.",
        "# TYPE sandstream_http_response_seconds histogram",
    ]
    for route, histogram in sorted(m.latency.items()):
        lines += histogram.lines("sandstream_http_response_seconds", f'route="{route}"')
    lines += [
        "# HELP sandstream_task_stage_seconds Time tasks spent in each stage (from the event "
        "log): " + "; ".join(f"{stage}: {what}" for stage, what in STAGES.items()) + ".",
        "# TYPE sandstream_task_stage_seconds histogram",
    ]
    for stage, histogram in m.stages.histograms.items():
        lines += histogram.lines("sandstream_task_stage_seconds", f'stage="{stage}"')
    lines += [
        "# HELP sandstream_tasks Tasks known to this gateway, by status.",
        "# TYPE sandstream_tasks gauge",
    ]
    by_status = Counter(task.status.value for task in projection.tasks.values())
    for task_status, count in sorted(by_status.items()):
        lines.append(f'sandstream_tasks{{status="{task_status}"}} {count}')
    lines += [
        "# HELP sandstream_stream_sequence Last stream sequence folded into the task view.",
        "# TYPE sandstream_stream_sequence gauge",
        f"sandstream_stream_sequence {projection.last_seq}",
        "# HELP sandstream_nats_connected 1 when the gateway is connected to NATS.",
        "# TYPE sandstream_nats_connected gauge",
        f"sandstream_nats_connected {int(connected)}",
    ]
    return "\n".join(lines) + "\n"
