"""How a task turned out (shared/outcome.py), branch by branch, on hand-made histories."""

from __future__ import annotations

from typing import Any

import pytest

from shared import events as ev
from shared.outcome import decide

T = "t_outcome"


def env(kind: str, attempt: int | str = 1) -> dict[str, Any]:
    return {"event_id": ev.event_id(T, kind, attempt), "task_id": T, "tenant": "acme"}


def completed(exit_code: int = 0, is_error: bool = False, text: str = "") -> ev.ExecutionCompleted:
    return ev.ExecutionCompleted(
        **env("ExecutionEnded"), text=text, is_error=is_error, exit_code=exit_code
    )


def failed(code: str = "oom", message: str = "killed") -> ev.ExecutionFailed:
    return ev.ExecutionFailed(**env("ExecutionEnded", 2), code=code, message=message)


def terminal(kind: type[ev.Event], **extra: Any) -> ev.AnyEvent:
    event = kind(event_id=ev.terminal_id(T), task_id=T, tenant="acme", **extra)
    assert isinstance(event, ev.TERMINAL_TYPES)
    return event


REQUESTED = ev.TaskRequested(**env("TaskRequested"), spec=ev.TaskSpec(prompt="p"))


def test_a_clean_run_succeeds_and_keeps_its_execution() -> None:
    run = completed()
    outcome = decide([REQUESTED, run], T, "completed")
    assert (outcome.status, outcome.error, outcome.execution) == ("succeeded", None, run)
    again = decide([REQUESTED, run, terminal(ev.TaskSucceeded)], T, "completed")
    assert again.status == "succeeded"


@pytest.mark.parametrize(
    ("ending", "status", "code", "message"),
    [
        (
            terminal(ev.TaskTimedOut, timeout_s=30),
            "timed_out",
            "timeout",
            "the task ran longer than its timeout_s of 30 seconds",
        ),
        (terminal(ev.TaskCancelled, reason="by me"), "cancelled", "cancelled", "by me"),
        (terminal(ev.TaskCancelled), "cancelled", "cancelled", "the task was cancelled"),
    ],
)
def test_a_timeout_or_cancel_wins_over_a_clean_run(
    ending: ev.AnyEvent, status: str, code: str, message: str
) -> None:
    outcome = decide([REQUESTED, completed(), ending], T, "timeout")
    assert outcome.status == status
    assert outcome.error == ev.ErrorInfo(code=code, message=message)


def test_the_first_ending_counts() -> None:
    timed_out = terminal(ev.TaskTimedOut, timeout_s=5)
    cancelled = ev.TaskCancelled(event_id=f"{T}:later", task_id=T, tenant="acme")
    assert decide([REQUESTED, timed_out, cancelled], T, "timeout").status == "timed_out"


def test_the_last_execution_counts_and_names_its_error() -> None:
    outcome = decide([REQUESTED, completed(), failed("oom", "out of memory")], T, "failed")
    assert outcome.status == "failed" and outcome.error == ev.ErrorInfo(
        code="oom", message="out of memory"
    )


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (completed(exit_code=1), "the agent exited with code 1"),
        (
            completed(is_error=True, text="  bad things  "),
            "the agent reported an error (exit code 0): bad things",
        ),
        (completed(is_error=True), "the agent reported an error (exit code 0): no message"),
        (
            completed(is_error=True, text="y" * 600),
            "the agent reported an error (exit code 0): " + "y" * 500,
        ),
    ],
)
def test_a_cli_that_failed_is_cli_error(run: ev.ExecutionCompleted, message: str) -> None:
    outcome = decide([REQUESTED, run], T, "completed")
    assert outcome.status == "failed"
    assert outcome.error == ev.ErrorInfo(code="cli_error", message=message)


def test_a_clean_run_of_a_task_that_failed_otherwise_keeps_that_error() -> None:
    error = ev.ErrorInfo(code="storage_failed", message="no store")
    outcome = decide([REQUESTED, completed(), terminal(ev.TaskFailed, error=error)], T, "failed")
    assert (outcome.status, outcome.error) == ("failed", error)
    assert decide([REQUESTED, terminal(ev.TaskFailed, error=error)], T, "failed").error == error


def test_no_execution_at_all_is_a_lost_sandbox() -> None:
    outcome = decide([REQUESTED], T, "killed")
    assert outcome.status == "failed" and outcome.execution is None
    assert outcome.error == ev.ErrorInfo(
        code="sandbox_lost", message="the sandbox stopped (killed) before the agent finished"
    )


def test_other_tasks_events_are_not_read() -> None:
    other = ev.TaskTimedOut(event_id="t_other:terminal", task_id="t_other", tenant="a", timeout_s=1)
    # Before this task's own events, so stopping at it would lose them.
    assert decide([other, REQUESTED, completed()], T, "completed").status == "succeeded"
