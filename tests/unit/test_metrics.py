"""The gateway's histograms: stage times of tasks from their events' times, in Prometheus form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.gateway.metrics import Histogram, Metrics, StageTimes, exposition
from services.gateway.projection import Projection
from shared import events as ev
from shared.bus import Record

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run_of(task: str, *, started: float, execution: float, output: float, ended: float,
           terminal: float) -> list[ev.AnyEvent]:  # fmt: skip
    common: dict[str, Any] = {"task_id": task, "tenant": "acme"}
    return [
        ev.TaskRequested(event_id=f"{task}:r", at=at(0), spec=ev.TaskSpec(prompt="p"), **common),
        ev.SandboxStarted(event_id=f"{task}:s", at=at(started), sandbox="s", image="i", **common),
        ev.ExecutionStarted(event_id=f"{task}:e", at=at(execution), sandbox="s", **common),
        ev.AgentOutput(event_id=f"{task}:o0", at=at(output), batch=0, lines=["{}"], **common),
        ev.AgentOutput(event_id=f"{task}:o1", at=at(ended), batch=1, lines=["{}"], **common),
        ev.ExecutionCompleted(
            event_id=f"{task}:c", at=at(ended), text="", is_error=False, exit_code=0, **common
        ),
        ev.TaskSucceeded(event_id=f"{task}:t", at=at(terminal), **common),
    ]


def test_each_stage_is_timed_once_per_task_from_the_events() -> None:
    stages = StageTimes()
    events = run_of("t_a", started=0.03, execution=0.1, output=0.6, ended=2.0, terminal=2.04)
    for event in [*events, events[1], events[3]]:  # repeats change nothing
        stages.observe(event)
    seen = {name: (h.count, round(h.sum, 3)) for name, h in stages.histograms.items()}
    assert seen == {
        "queued": (1, 0.03),
        "preparing": (1, 0.07),
        "first_output": (1, 0.5),
        "running": (1, 1.9),
        "finishing": (1, 0.04),
        "total": (1, 2.04),
    }
    assert stages._open == {}  # forgotten at its end


def test_a_task_cancelled_while_queued_counts_only_its_total() -> None:
    stages = StageTimes()
    common: dict[str, Any] = {"task_id": "t_q", "tenant": "acme"}
    stages.observe(ev.TaskRequested(event_id="r", at=at(0), spec=ev.TaskSpec(prompt="p"), **common))
    stages.observe(ev.TaskCancelled(event_id="c", at=at(5), **common))
    assert {n: h.count for n, h in stages.histograms.items() if h.count} == {"total": 1}


def test_histogram_lines_are_cumulative_with_sum_and_count() -> None:
    h = Histogram((0.01, 0.1))
    for value in (0.005, 0.01, 0.05, 3.0):
        h.observe(value)
    assert h.lines("x_seconds", 'stage="a"') == [
        'x_seconds_bucket{stage="a",le="0.01"} 2',
        'x_seconds_bucket{stage="a",le="0.1"} 3',
        'x_seconds_bucket{stage="a",le="+Inf"} 4',
        'x_seconds_sum{stage="a"} 3.065000',
        'x_seconds_count{stage="a"} 4',
    ]


def test_the_exposition_has_stage_and_route_histograms() -> None:
    metrics = Metrics()
    projection = Projection(on_event=metrics.stages.observe)
    events = run_of("t_b", started=0.02, execution=0.05, output=0.3, ended=1.0, terminal=1.01)
    for seq, event in enumerate(events, start=1):
        projection.apply(ev_record(seq, event))
    metrics.observe("/v1/tasks", 202, 0.004)
    text = exposition(metrics, projection, connected=True)
    assert "# TYPE sandstream_task_stage_seconds histogram" in text
    assert 'sandstream_task_stage_seconds_bucket{stage="queued",le="0.025"} 1' in text
    assert 'sandstream_task_stage_seconds_bucket{stage="queued",le="0.01"} 0' in text
    assert 'sandstream_task_stage_seconds_count{stage="total"} 1' in text
    assert 'sandstream_http_response_seconds_bucket{route="/v1/tasks",le="0.005"} 1' in text
    assert 'sandstream_tasks{status="succeeded"} 1' in text


def ev_record(seq: int, event: ev.AnyEvent) -> Record:
    return Record(seq, f"t.{event.task_id}", event.at, event)
