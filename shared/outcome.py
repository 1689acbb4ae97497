"""How a task turned out, decided once, from its history: status and error.

Storage calls :func:`decide` when it builds ``result.json`` and puts the same status and error
in ``ResultStored``; the lifecycle copies them into the terminal event and never derives them
again. The fold (``shared/state.py``) takes the error from the terminal event.

- ``timed_out`` / ``cancelled`` when the task's terminal event says so;
- ``succeeded`` when the last execution completed with exit code 0 and ``is_error`` false, and
  no other ending was recorded;
- otherwise ``failed`` with the most specific error known: the execution's own code
  (``ExecutionFailed``), ``cli_error`` for a CLI that exited non-zero or reported an error,
  the terminal ``TaskFailed``'s error, or ``sandbox_lost``.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.events import (
    AnyEvent,
    ErrorInfo,
    ExecutionCompleted,
    ExecutionFailed,
    ResultStatus,
    TaskCancelled,
    TaskFailed,
    TaskSucceeded,
    TaskTimedOut,
    TerminalEvent,
)


class Outcome(msgspec.Struct, frozen=True):
    status: ResultStatus
    error: ErrorInfo | None = None
    execution: ExecutionCompleted | ExecutionFailed | None = None
    """The last attempt's end, which the result's other fields come from."""


def decide(history: Sequence[AnyEvent], task_id: str, stopped_reason: str) -> Outcome:
    """The outcome of ``task_id`` from its events (in stream order); see the module docs."""
    terminal: TerminalEvent | None = None
    execution: ExecutionCompleted | ExecutionFailed | None = None
    for event in history:
        if event.task_id != task_id:
            continue
        if isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled | TaskTimedOut):
            terminal = terminal or event  # a task ends once: the first ending counts
        elif isinstance(event, ExecutionCompleted | ExecutionFailed):
            execution = event  # the last attempt's end
    status, error = _status(terminal, execution, stopped_reason)
    return Outcome(status, error, execution)


def _status(
    terminal: TerminalEvent | None,
    execution: ExecutionCompleted | ExecutionFailed | None,
    stopped_reason: str,
) -> tuple[ResultStatus, ErrorInfo | None]:
    if isinstance(terminal, TaskTimedOut):
        message = f"the task ran longer than its timeout_s of {terminal.timeout_s} seconds"
        return "timed_out", ErrorInfo(code="timeout", message=message)
    if isinstance(terminal, TaskCancelled):
        message = terminal.reason or "the task was cancelled"
        return "cancelled", ErrorInfo(code="cancelled", message=message)
    completed_ok = (
        isinstance(execution, ExecutionCompleted)
        and execution.exit_code == 0
        and not execution.is_error
    )
    if completed_ok and (terminal is None or isinstance(terminal, TaskSucceeded)):
        return "succeeded", None
    if isinstance(execution, ExecutionFailed):
        return "failed", ErrorInfo(code=execution.code, message=execution.message)
    if isinstance(execution, ExecutionCompleted) and not completed_ok:
        if execution.is_error:
            detail = execution.text.strip()[:500] or "no message"
            message = f"the agent reported an error (exit code {execution.exit_code}): {detail}"
        else:
            message = f"the agent exited with code {execution.exit_code}"
        return "failed", ErrorInfo(code="cli_error", message=message)
    if isinstance(terminal, TaskFailed):
        return "failed", terminal.error
    return "failed", ErrorInfo(
        code="sandbox_lost",
        message=f"the sandbox stopped ({stopped_reason}) before the agent finished",
    )
