"""``GET /metrics``: Prometheus text exposition, counted in process (no client library)."""

from __future__ import annotations

from collections import Counter

from services.gateway.projection import Projection


class Metrics:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.latency_sum_s = 0.0

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.responses[(route, status)] += 1
        self.latency_sum_s += seconds


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
        "# HELP sandstream_http_response_seconds_sum Time spent answering requests.",
        "# TYPE sandstream_http_response_seconds_sum counter",
        f"sandstream_http_response_seconds_sum {m.latency_sum_s:.6f}",
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
