"""What the lifecycle does about an event, decided from the task's state alone (no I/O).

The service reads the state (``shared.state``), asks here, and carries the decision out:
publish the terminal event first, then stop the sandbox (docs/flow.md). Every event built
here has a deterministic id, so carrying a decision out twice publishes it once.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from shared import events as ev
from shared.state import Status, TaskState

STOP_REASONS: Final[dict[Status, str]] = {
    Status.SUCCEEDED: "completed",
    Status.FAILED: "failed",
    Status.CANCELLED: "cancelled",
    Status.TIMED_OUT: "timeout",
}
"""``SandboxStopped.reason`` of a sandbox stopped because its task ended."""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    ending: ev.TerminalEvent | None = None
    """The task's terminal event, to publish before anything else."""
    stop: str | None = None
    """Stop the sandbox for this reason (the task goes on: its result is stored next)."""


NOTHING: Final = Decision()


def on_event(state: TaskState, event: ev.AnyEvent) -> Decision:
    """The decision for a control event of an open task."""
    match event:
        case ev.ExecutionCompleted():
            return Decision(stop="completed")
        case ev.ExecutionFailed():
            return Decision(stop="failed")
        case ev.ResultStored():
            error = None if event.status == "succeeded" else event.error or _unexplained(event)
            return Decision(ending=closing(state, event, error))
        case ev.StorageFailed():
            return Decision(ending=closing(state, event, event.error))
        case ev.TaskCancelRequested():
            cancelled = ev.TaskCancelled(**_terminal(state, event), reason=event.reason)
            return Decision(ending=cancelled)
    return NOTHING


def on_deadline(state: TaskState) -> Decision:
    """The task's deadline passed. A task whose sandbox already stopped is storing its
    result, and ends with that result instead."""
    if state.status is Status.STORING:
        return NOTHING
    requested = ev.event_id(state.task_id, "TaskRequested")
    timed_out = ev.TaskTimedOut(
        event_id=ev.terminal_id(state.task_id),
        task_id=state.task_id,
        tenant=state.tenant,
        causation_id=requested,
        timeout_s=state.timeout_s,
    )
    return Decision(ending=timed_out)


def closing(
    state: TaskState, cause: ev.ResultStored | ev.StorageFailed, error: ev.ErrorInfo | None
) -> ev.TaskSucceeded | ev.TaskFailed:
    """The result step is over: ``TaskSucceeded`` without an error, else ``TaskFailed`` with
    the error as storage decided it (copied, never derived here)."""
    if error is None:
        return ev.TaskSucceeded(**_terminal(state, cause))
    return ev.TaskFailed(**_terminal(state, cause), error=error)


def failed(cause: ev.Event, error: ev.ErrorInfo) -> ev.TaskFailed:
    """The task cannot go on (it cannot start, or its message was given up on)."""
    return ev.TaskFailed(
        event_id=ev.terminal_id(cause.task_id),
        task_id=cause.task_id,
        tenant=cause.tenant,
        causation_id=cause.event_id,
        error=error,
    )


def stop_reason(state: TaskState) -> str:
    """Why the sandbox of an ended task is stopped."""
    return STOP_REASONS.get(state.status, "failed")


def deadline(requested: ev.TaskRequested) -> float:
    """When the task times out (seconds since the epoch)."""
    return requested.at.timestamp() + requested.spec.timeout_s


def _terminal(state: TaskState, cause: ev.Event) -> dict[str, Any]:
    return {
        "event_id": ev.terminal_id(state.task_id),
        "task_id": state.task_id,
        "tenant": state.tenant,
        "causation_id": cause.event_id,
    }


def _unexplained(stored: ev.ResultStored) -> ev.ErrorInfo:
    """The error of a ``ResultStored`` written before it carried one (shared/outcome.py)."""
    return ev.ErrorInfo(
        code=stored.status,
        message=f"the result was stored with status {stored.status!r}",
    )
