"""A task's state as one pure fold over its events: ``apply(state, event) -> state``.

No I/O here. The gateway's projection, the CLI and the chaos checker all use this fold, so
"what status is this task in" has exactly one answer.

Rules:
- the first event of a task must be ``TaskRequested``; anything before it is ignored;
- a duplicate (same ``event_id`` as one already applied) changes nothing;
- after a terminal event nothing changes (late events are recorded as ``ignored``);
- statuses only move forward: queued → starting → running → storing → terminal;
- a ``SandboxStopped`` or ``ResultStored`` after the end still counts (not the status): a
  timeout or a cancel ends the task first, then its sandbox is stopped and what it left
  is stored, and that result is the task's too.

Besides the status it holds what the services decide on: whether the sandbox started and
stopped, whether the execution ended, and where the output goes on (``next_line``,
``next_batch``, ``output_bytes``; readers that skip output batches fold in just the last).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Final

import msgspec

from shared.events import (
    AgentOutput,
    AnyEvent,
    ErrorInfo,
    Event,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    ResultStored,
    SandboxStarted,
    SandboxStopped,
    StorageFailed,
    TaskCancelled,
    TaskCancelRequested,
    TaskFailed,
    TaskRequested,
    TaskSucceeded,
    TaskTimedOut,
    WorkspacePrepared,
    first_line,
)


class Status(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    STORING = "storing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}
)
_RANK: Final = {
    Status.QUEUED: 0,
    Status.STARTING: 1,
    Status.RUNNING: 2,
    Status.STORING: 3,
}


MAX_IGNORED = 64


class TaskState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    task_id: str
    tenant: str
    status: Status
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, str]
    request_hash: str = ""
    idempotency_key: str | None = None
    timeout_s: int = 600
    cancel_requested: bool = False
    result_location: str | None = None
    error: ErrorInfo | None = None
    seen: tuple[str, ...] = ()
    """Ids of the events applied, output batches apart (a dozen: a tuple of strings is left
    alone by the garbage collector, a set is not)."""
    sandbox_started: bool = False
    workspace_prepared: bool = False
    """The task's repository and files are in the workspace (``WorkspacePrepared``)."""
    sandbox_stopped: bool = False
    execution_ended: bool = False
    warnings: tuple[str, ...] = ()
    """What the run's end said did not go as asked (``result.json`` ``warnings``)."""
    next_line: int = 0
    """Index of the next output line of the run (after every ``AgentOutput`` folded in)."""
    next_batch: int = 0
    output_bytes: int = 0
    ignored: tuple[str, ...] = ()
    """Event ids that arrived after the end or out of order: kept for audits (the first
    ``MAX_IGNORED``), never applied."""


def _advance(state: TaskState, status: Status, event: Event) -> TaskState:
    if _RANK[status] < _RANK[state.status]:
        return state  # a late, out-of-order event never moves a task backwards
    return msgspec.structs.replace(state, status=status, updated_at=event.at)


def apply(state: TaskState | None, event: AnyEvent) -> TaskState | None:
    """Fold one event into the state of its task (``None`` means "no task yet")."""
    if state is None:
        if not isinstance(event, TaskRequested):
            return None
        return TaskState(
            task_id=event.task_id,
            tenant=event.tenant,
            status=Status.QUEUED,
            created_at=event.at,
            updated_at=event.at,
            metadata=dict(event.spec.metadata),
            request_hash=event.request_hash,
            idempotency_key=event.idempotency_key,
            timeout_s=event.spec.timeout_s,
            seen=(event.event_id,),
        )
    if event.event_id in state.seen:
        return state
    if state.status.terminal or isinstance(event, TaskRequested):
        return _late(state, event)

    if not isinstance(event, AgentOutput):
        # Output batches are most of a task's events, and applying one twice changes
        # nothing; tracking their ids would make every event cost the task's length.
        state = msgspec.structs.replace(state, seen=(*state.seen, event.event_id))
    match event:
        case SandboxStarted():
            state = msgspec.structs.replace(state, sandbox_started=True)
            return _advance(state, Status.STARTING, event)
        case WorkspacePrepared():
            return msgspec.structs.replace(state, workspace_prepared=True)
        case AgentOutput():
            return _advance(_output(state, event), Status.RUNNING, event)
        case ExecutionStarted():
            return _advance(state, Status.RUNNING, event)
        case ExecutionCompleted() | ExecutionFailed():
            warnings = tuple(event.warnings[:16])
            state = msgspec.structs.replace(state, execution_ended=True, warnings=warnings)
            return _advance(state, Status.STORING, event)
        case SandboxStopped():
            state = msgspec.structs.replace(state, sandbox_stopped=True)
            return _advance(state, Status.STORING, event)
        case StorageFailed():
            return _advance(state, Status.STORING, event)
        case ResultStored():
            state = msgspec.structs.replace(state, result_location=event.location)
            return _advance(state, Status.STORING, event)
        case TaskCancelRequested():
            return msgspec.structs.replace(state, cancel_requested=True, updated_at=event.at)
        case TaskSucceeded():
            return _end(state, Status.SUCCEEDED, event, None)
        case TaskFailed():
            return _end(state, Status.FAILED, event, event.error)
        case TaskCancelled():
            error = ErrorInfo(code="cancelled", message=event.reason or "the task was cancelled")
            return _end(state, Status.CANCELLED, event, error)
        case TaskTimedOut():
            message = f"the task ran longer than its timeout_s of {event.timeout_s} seconds"
            return _end(state, Status.TIMED_OUT, event, ErrorInfo(code="timeout", message=message))
    return state


def _late(state: TaskState, event: AnyEvent) -> TaskState:
    """An event after the end (or a second request): recorded, never applied, except for
    the facts about the sandbox and the result that outlive the status."""
    seen = (*state.seen, event.event_id)
    if state.status.terminal and isinstance(event, SandboxStopped):
        return msgspec.structs.replace(state, sandbox_stopped=True, seen=seen)
    if state.status.terminal and isinstance(event, ResultStored):
        return msgspec.structs.replace(state, result_location=event.location, seen=seen)
    if len(state.ignored) >= MAX_IGNORED:
        return state
    return msgspec.structs.replace(state, ignored=(*state.ignored, event.event_id))


def _output(state: TaskState, event: AgentOutput) -> TaskState:
    """Where the output goes on after ``event`` (a batch seen again moves nothing back)."""
    end = (first_line(event) or 0) + len(event.lines)
    if end <= state.next_line and event.batch < state.next_batch:
        return state
    return msgspec.structs.replace(
        state,
        next_line=max(state.next_line, end),
        next_batch=max(state.next_batch, event.batch + 1),
        output_bytes=max(state.output_bytes, event.output_bytes),
    )


def _end(state: TaskState, status: Status, event: Event, error: ErrorInfo | None) -> TaskState:
    return msgspec.structs.replace(state, status=status, updated_at=event.at, error=error)


def fold(events: list[AnyEvent]) -> TaskState | None:
    state: TaskState | None = None
    for event in events:
        state = apply(state, event)
    return state
