"""The task state fold: every transition, duplicates, and events after the end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from shared import events as ev
from shared.state import Status, TaskState, apply, fold

T = "t_unit"
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def requested(t: float = 0) -> ev.TaskRequested:
    return ev.TaskRequested(
        event_id=ev.event_id(T, "TaskRequested"),
        task_id=T,
        tenant="acme",
        at=at(t),
        spec=ev.TaskSpec(prompt="p", timeout_s=5, metadata={"k": "v"}),
        request_hash="h",
    )


def started(t: float = 1) -> ev.SandboxStarted:
    return ev.SandboxStarted(
        event_id=ev.event_id(T, "SandboxStarted"),
        task_id=T,
        tenant="acme",
        at=at(t),
        sandbox="s",
        image="i",
    )


def exec_started(t: float = 2) -> ev.ExecutionStarted:
    return ev.ExecutionStarted(
        event_id=ev.event_id(T, "ExecutionStarted"), task_id=T, tenant="acme", at=at(t), sandbox="s"
    )


def output(batch: int, t: float = 3) -> ev.AgentOutput:
    return ev.AgentOutput(
        event_id=ev.event_id(T, "AgentOutput", batch),
        task_id=T,
        tenant="acme",
        at=at(t),
        batch=batch,
        lines=["{}"],
    )


def completed(t: float = 4) -> ev.ExecutionCompleted:
    return ev.ExecutionCompleted(
        event_id=ev.event_id(T, "ExecutionEnded"),
        task_id=T,
        tenant="acme",
        at=at(t),
        text="ok",
        is_error=False,
        exit_code=0,
    )


def failed_exec(t: float = 4) -> ev.ExecutionFailed:
    return ev.ExecutionFailed(
        event_id=ev.event_id(T, "ExecutionEnded"),
        task_id=T,
        tenant="acme",
        at=at(t),
        code="cli_error",
        message="boom",
    )


def stopped(t: float = 5) -> ev.SandboxStopped:
    return ev.SandboxStopped(
        event_id=ev.event_id(T, "SandboxStopped"),
        task_id=T,
        tenant="acme",
        at=at(t),
        sandbox="s",
        reason="completed",
    )


def stored(t: float = 6) -> ev.ResultStored:
    return ev.ResultStored(
        event_id=ev.event_id(T, "ResultStored"),
        task_id=T,
        tenant="acme",
        at=at(t),
        status="succeeded",
        location="file:///r/",
        objects=[],
    )


def end(kind: type[ev.Event], t: float = 7) -> ev.AnyEvent:
    extra: dict[str, Any] = {}
    if kind is ev.TaskFailed:
        extra["error"] = ev.ErrorInfo(code="cli_error", message="boom")
    if kind is ev.TaskTimedOut:
        extra["timeout_s"] = 5
    event = kind(event_id=ev.terminal_id(T), task_id=T, tenant="acme", at=at(t), **extra)
    assert isinstance(event, ev.TERMINAL_TYPES)
    return event


def final(events: list[ev.AnyEvent]) -> TaskState:
    state = fold(events)
    assert state is not None
    return state


def test_requested_is_queued() -> None:
    state = final([requested()])
    assert state.status is Status.QUEUED
    assert state.tenant == "acme" and state.metadata == {"k": "v"} and state.timeout_s == 5
    assert state.created_at == state.updated_at == at(0)


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([requested(), started()], Status.STARTING),
        ([requested(), started(), exec_started()], Status.RUNNING),
        ([requested(), started(), output(0)], Status.RUNNING),
        ([requested(), started(), exec_started(), completed()], Status.STORING),
        ([requested(), started(), exec_started(), failed_exec()], Status.STORING),
        ([requested(), started(), completed(), stopped()], Status.STORING),
        ([requested(), started(), completed(), stopped(), stored()], Status.STORING),
    ],
    ids=["started", "exec", "output", "completed", "exec-failed", "stopped", "stored"],
)
def test_forward_transitions(events: list[ev.AnyEvent], status: Status) -> None:
    state = final(events)
    assert state.status is status
    assert state.updated_at == events[-1].at


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        (ev.TaskSucceeded, Status.SUCCEEDED, None),
        (ev.TaskFailed, Status.FAILED, "cli_error"),
        (ev.TaskCancelled, Status.CANCELLED, "cancelled"),
        (ev.TaskTimedOut, Status.TIMED_OUT, "timeout"),
    ],
)
def test_terminal_events(kind: type[ev.Event], status: Status, code: str | None) -> None:
    state = final([requested(), started(), end(kind)])
    assert state.status is status and state.status.terminal
    assert (state.error.code if state.error else None) == code


def test_terminal_straight_from_queued() -> None:
    assert final([requested(), end(ev.TaskCancelled)]).status is Status.CANCELLED


def test_stored_result_location_is_kept() -> None:
    state = final([requested(), started(), completed(), stopped(), stored()])
    assert state.result_location == "file:///r/"


def test_cancel_request_is_a_flag_not_an_ending() -> None:
    cancel = ev.TaskCancelRequested(
        event_id=ev.event_id(T, "TaskCancelRequested"), task_id=T, tenant="acme", at=at(2)
    )
    state = final([requested(), started(), cancel])
    assert state.cancel_requested and state.status is Status.STARTING


def test_duplicates_change_nothing() -> None:
    once = final([requested(), started(), output(0)])
    twice = final([requested(), requested(), started(), started(), output(0), output(0)])
    assert twice == once


def test_nothing_changes_after_the_end() -> None:
    ended = final([requested(), started(), end(ev.TaskSucceeded)])
    late = final(
        [requested(), started(), end(ev.TaskSucceeded), completed(t=9), end(ev.TaskFailed, t=10)]
    )
    assert late.status is Status.SUCCEEDED and late.error is None
    assert late.updated_at == ended.updated_at
    # the second ending has the same id as the first: a duplicate, not even recorded
    assert late.ignored == (ev.event_id(T, "ExecutionEnded"),)


def test_late_out_of_order_event_never_moves_backwards() -> None:
    state = final([requested(), started(), completed(), started(t=9)])
    assert state.status is Status.STORING


def test_events_before_the_request_are_ignored() -> None:
    assert apply(None, started()) is None
    assert fold([started(), requested()]) is not None


# ---- found by mutation testing (make mutants): facts the fold keeps that nothing checked ------


def test_the_request_is_kept_as_asked() -> None:
    keyed = msgspec.structs.replace(requested(), idempotency_key="key-1", request_hash="h-1")
    state = fold([keyed])
    assert state is not None
    assert (state.task_id, state.idempotency_key, state.request_hash) == (T, "key-1", "h-1")


def test_every_change_moves_updated_at() -> None:
    ask = ev.TaskCancelRequested(
        event_id=ev.event_id(T, "TaskCancelRequested"), task_id=T, tenant="acme", at=at(4)
    )
    state = fold([requested(), started(), ask])
    assert state is not None and state.cancel_requested and state.updated_at == at(4)
    ended = ev.TaskSucceeded(event_id=ev.terminal_id(T), task_id=T, tenant="acme", at=at(9))
    done = apply(state, ended)
    assert done is not None and done.updated_at == at(9)


@pytest.mark.parametrize(
    ("reason", "message"), [("stopped by ops", "stopped by ops"), ("", "the task was cancelled")]
)
def test_a_cancel_says_why(reason: str, message: str) -> None:
    cancelled = ev.TaskCancelled(
        event_id=ev.terminal_id(T), task_id=T, tenant="acme", at=at(5), reason=reason
    )
    state = fold([requested(), cancelled])
    assert state is not None and state.error == ev.ErrorInfo(code="cancelled", message=message)


def test_a_timeout_names_its_limit() -> None:
    timed_out = ev.TaskTimedOut(
        event_id=ev.terminal_id(T), task_id=T, tenant="acme", at=at(8), timeout_s=7
    )
    state = fold([requested(), timed_out])
    assert state is not None and state.error is not None
    assert state.error.code == "timeout" and "7 seconds" in state.error.message


def test_the_state_stays_small_however_long_the_task() -> None:
    """Output batches are not remembered one by one (each event costs O(1)), and what
    arrives after the end is kept for audits only up to a bound."""
    from shared.state import MAX_IGNORED

    state = fold([requested(), started(), exec_started(), *(output(b) for b in range(2000))])
    assert state is not None and state.status is Status.RUNNING
    assert len(state.seen) == 3  # the request, the start, the execution start
    late = [output(b, t=20) for b in range(2000, 2000 + 2 * MAX_IGNORED)]
    ended = fold([requested(), end(ev.TaskSucceeded), *late])
    assert ended is not None and len(ended.ignored) == MAX_IGNORED


# ---- what the services decide on: sandbox, execution, output position --------------------


def test_the_fold_knows_the_sandbox_the_execution_and_where_output_goes_on() -> None:
    running = final([requested(), started(), exec_started(), output(0), output(1)])
    assert running.sandbox_started and not running.sandbox_stopped
    assert not running.execution_ended
    assert (running.next_line, running.next_batch) == (2, 2)  # one line per batch here
    again = final([requested(), started(), exec_started(), output(0), output(1), output(0)])
    assert (again.next_line, again.next_batch) == (2, 2)  # a batch seen again moves nothing
    ended = final([requested(), started(), output(0), completed()])
    assert ended.execution_ended and ended.status is Status.STORING


def test_a_stopped_sandbox_and_a_stored_result_after_the_end_still_count() -> None:
    timed_out = end(ev.TaskTimedOut)
    state = final([requested(), started(), timed_out, stopped(t=8), stored(t=9)])
    assert state.status is Status.TIMED_OUT and state.updated_at == timed_out.at
    assert state.sandbox_stopped and state.result_location == stored().location
    assert state.ignored == ()


def test_an_output_batch_without_the_field_takes_its_first_line_from_its_id() -> None:
    old = msgspec.structs.replace(output(0), event_id=ev.event_id(T, "AgentOutput", 40))
    assert old.first_line is None and ev.first_line(old) == 40
    assert final([requested(), started(), old]).next_line == 41
