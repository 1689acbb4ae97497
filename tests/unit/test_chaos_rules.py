"""The chaos run's state-machine rules (tests/chaos/rules.py) on hand-made histories, and its
S3 server's recording after a kill."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared import events as ev
from tests.chaos.rules import violations
from tests.chaos.s3server import trim_recording

T = "t_rules"
BASE = datetime(2026, 1, 1, tzinfo=UTC)
_clock = iter(range(1_000_000))


def env(kind: str, attempt: int | str = 1) -> dict[str, Any]:
    return {
        "event_id": ev.event_id(T, kind, attempt),
        "task_id": T,
        "tenant": "acme",
        "at": BASE + timedelta(seconds=next(_clock)),
    }


def requested() -> ev.TaskRequested:
    return ev.TaskRequested(**env("TaskRequested"), spec=ev.TaskSpec(prompt="p"))


def sandbox_started() -> ev.SandboxStarted:
    return ev.SandboxStarted(**env("SandboxStarted"), sandbox="s", image="i")


def exec_started() -> ev.ExecutionStarted:
    return ev.ExecutionStarted(**env("ExecutionStarted"), sandbox="s")


def output(first: int, lines: int = 2, batch: int = 0) -> ev.AgentOutput:
    return ev.AgentOutput(**env("AgentOutput", first), batch=batch, lines=["{}"] * lines)


def completed() -> ev.ExecutionCompleted:
    return ev.ExecutionCompleted(**env("ExecutionEnded"), text="ok", is_error=False, exit_code=0)


def exec_failed() -> ev.ExecutionFailed:
    return ev.ExecutionFailed(**env("ExecutionEnded"), code="sandbox_lost", message="gone")


def stopped(reason: str = "completed") -> ev.SandboxStopped:
    return ev.SandboxStopped(**env("SandboxStopped"), sandbox="s", reason=reason)


def stored(status: ev.ResultStatus = "succeeded") -> ev.ResultStored:
    return ev.ResultStored(**env("ResultStored"), status=status, location="file:///x", objects=[])


def succeeded() -> ev.TaskSucceeded:
    return ev.TaskSucceeded(**{**env("x"), "event_id": ev.terminal_id(T)})


def failed() -> ev.TaskFailed:
    error = ev.ErrorInfo(code="internal", message="gave up")
    return ev.TaskFailed(**{**env("x"), "event_id": ev.terminal_id(T)}, error=error)


def timed_out() -> ev.TaskTimedOut:
    return ev.TaskTimedOut(**{**env("x"), "event_id": ev.terminal_id(T)}, timeout_s=5)


def cancelled() -> ev.TaskCancelled:
    return ev.TaskCancelled(**{**env("x"), "event_id": ev.terminal_id(T)}, reason="asked")


def happy() -> list[ev.AnyEvent]:
    return [
        requested(),
        sandbox_started(),
        exec_started(),
        output(0, 2, 0),
        output(2, 3, 1),
        completed(),
        stopped(),
        stored(),
        succeeded(),
    ]


def test_the_normal_flow_is_clean() -> None:
    assert violations(happy()) == []


def test_a_timeout_then_stop_and_store_is_clean_even_with_a_late_execution_end() -> None:
    events: list[ev.AnyEvent] = [
        requested(),
        sandbox_started(),
        exec_started(),
        timed_out(),
        exec_failed(),  # the executor raced the lifecycle: ignored by the fold, kept for audits
        stopped("timeout"),
        stored("timed_out"),
    ]
    assert violations(events) == []


def test_a_task_cancelled_before_its_sandbox_is_clean() -> None:
    events: list[ev.AnyEvent] = [
        requested(),
        cancelled(),
        stopped("cancelled"),
        stored("cancelled"),
    ]
    assert violations(events) == []


def test_a_give_up_before_any_sandbox_is_clean() -> None:
    assert violations([requested(), failed()]) == []


def test_a_second_ending_is_a_violation() -> None:
    found = violations([*happy(), failed()])
    assert any("second terminal event" in v for v in found), found


def test_anything_but_a_cancel_request_after_success_is_a_violation() -> None:
    late_cancel = ev.TaskCancelRequested(**env("TaskCancelRequested"))
    assert violations([*happy(), late_cancel]) == []
    found = violations([*happy(), output(5, 1, 2)])
    assert any("after the terminal TaskSucceeded" in v for v in found), found


@pytest.mark.parametrize(
    "twice",
    [sandbox_started, exec_started, completed, stopped, stored],
)
def test_each_step_happens_once(twice: Any) -> None:
    events = happy()
    position = next(i for i, e in enumerate(events) if type(e) is type(twice())) + 1
    extra = twice()
    events.insert(position, extra)
    found = violations(events)
    assert any("more than once" in v for v in found), found


def test_a_stored_duplicate_id_is_a_violation() -> None:
    events = happy()
    events.insert(3, events[2])
    found = violations(events)
    assert any("stored 2 times" in v for v in found), found


def test_execution_before_its_sandbox_is_a_violation() -> None:
    events = happy()
    events[1], events[2] = events[2], events[1]
    found = violations(events)
    assert any("ExecutionStarted (#1) before SandboxStarted" in v for v in found), found


def test_output_before_the_claim_and_after_the_end_are_violations() -> None:
    found = violations([requested(), sandbox_started(), output(0), exec_started()])
    assert any("AgentOutput (#2) before ExecutionStarted" in v for v in found), found
    events = happy()
    events.insert(6, output(5, 1, 2))
    found = violations(events)
    assert any("after the execution ended" in v for v in found), found


def test_a_gap_in_the_output_is_a_violation_an_overlap_is_not() -> None:
    events = happy()
    events[4] = output(3, 3, 1)  # lines 0-1, then 3-5: line 2 is lost
    found = violations(events)
    assert any("lines 2.. lost" in v for v in found), found
    events[4] = output(1, 3, 1)  # a re-published overlap: the transcript dedupes it
    assert violations(events) == []


def test_success_needs_a_stored_successful_result() -> None:
    events = happy()
    del events[7]
    found = violations(events)
    assert any("TaskSucceeded (#7) before ResultStored" in v for v in found), found
    events = happy()
    events[7] = stored("failed")
    found = violations(events)
    assert any("stored as 'failed'" in v for v in found), found


def test_the_stored_status_must_match_the_ending() -> None:
    events: list[ev.AnyEvent] = [requested(), timed_out(), stopped("timeout"), stored("failed")]
    found = violations(events)
    assert any("ResultStored status 'failed' but the task ended TaskTimedOut" in v for v in found)


def test_storing_before_the_sandbox_stopped_is_a_violation() -> None:
    events = happy()
    events[6], events[7] = events[7], events[6]
    found = violations(events)
    assert any("ResultStored (#6) before SandboxStopped" in v for v in found), found


def test_a_history_must_begin_with_its_request_and_end() -> None:
    found = violations(happy()[1:])
    assert any("first event is SandboxStarted" in v for v in found), found
    unfinished = happy()[:5]
    assert violations(unfinished, require_end=False) == []
    assert "no terminal event" in violations(unfinished)
    assert violations([]) == ["empty history"]


def test_a_recording_cut_by_a_kill_loses_only_its_last_request(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    whole = b'{"method": "PUT", "url": "a"}\n{"method": "PUT", "url": "b"}\n'
    path.write_bytes(whole + b'{"method": "PUT", "url": "c", "bo')
    assert trim_recording(path) == 2 and path.read_bytes() == whole
    assert trim_recording(path) == 2 and path.read_bytes() == whole  # nothing more to drop
    path.write_bytes(b'{"cut": \n')  # a line ended, yet not whole
    assert trim_recording(path) == 0 and path.read_bytes() == b""
