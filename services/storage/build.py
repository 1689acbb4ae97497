"""From a task's history to the three stored objects: pure functions, no I/O.

The output depends only on the history, never on the clock, so handling the same
``SandboxStopped`` twice (a redelivery, or two replicas racing) writes the same bytes with the
same sha256.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.events import (
    AgentOutput,
    AnyEvent,
    ErrorInfo,
    ExecutionCompleted,
    ExecutionFailed,
    SandboxStopped,
    TaskCancelled,
    TaskFailed,
    TaskSucceeded,
    TaskTimedOut,
    TerminalEvent,
)
from shared.results import ResultStatus, TaskResult, encode_result


class Artifacts(msgspec.Struct, frozen=True, kw_only=True):
    """The task's result and the bytes of its three objects."""

    result: TaskResult
    result_json: bytes
    transcript: bytes
    diff: bytes


def build(history: Sequence[AnyEvent], stopped: SandboxStopped) -> Artifacts:
    """Everything storage writes for the task that ``stopped`` ends."""
    result = build_result(history, stopped)
    return Artifacts(
        result=result,
        result_json=encode_result(result),
        transcript=build_transcript(history),
        diff=result.diff.encode(),
    )


def build_result(history: Sequence[AnyEvent], stopped: SandboxStopped) -> TaskResult:
    """``result.json`` per docs/api.md.

    ``status``: ``timed_out`` / ``cancelled`` when the task's terminal event says so;
    ``succeeded`` when the (last) execution completed with exit code 0 and ``is_error`` false
    and no other ending was recorded; otherwise ``failed`` with the most specific error known.
    """
    terminal: TerminalEvent | None = None
    execution: ExecutionCompleted | ExecutionFailed | None = None
    for event in history:
        if event.task_id != stopped.task_id:
            continue
        if isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled | TaskTimedOut):
            terminal = terminal or event  # a task ends once: the first ending counts
        elif isinstance(event, ExecutionCompleted | ExecutionFailed):
            execution = event  # the last attempt's end

    status, error = _outcome(terminal, execution, stopped)
    sandbox = stopped.usage
    if execution is None:
        return TaskResult(
            task_id=stopped.task_id, status=status, is_error=True, sandbox=sandbox, error=error
        )
    return TaskResult(
        task_id=stopped.task_id,
        status=status,
        text=execution.text,
        is_error=execution.is_error if isinstance(execution, ExecutionCompleted) else True,
        exit_code=execution.exit_code,
        num_turns=execution.num_turns,
        total_cost_usd=execution.total_cost_usd,
        usage=dict(execution.usage),
        session_id=execution.session_id,
        permission_denials=list(execution.permission_denials),
        duration_ms=execution.duration_ms,
        diff=execution.diff,
        files_changed=list(execution.files_changed),
        sandbox=sandbox,
        model_usage=execution.model_usage,
        error=error,
    )


def _outcome(
    terminal: TerminalEvent | None,
    execution: ExecutionCompleted | ExecutionFailed | None,
    stopped: SandboxStopped,
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
        message=f"the sandbox stopped ({stopped.reason}) before the agent finished",
    )


def build_transcript(history: Sequence[AnyEvent]) -> bytes:
    """Every ``AgentOutput`` line once, in order, one per line (JSON Lines).

    Batches are ordered by their first line's index, which their event id carries
    (``<task>:AgentOutput:<first line index>``); a line delivered twice (a re-published or
    overlapping batch) is written once. Ids that do not carry an index fall back to ``batch``.
    """
    outputs = [e for e in history if isinstance(e, AgentOutput)]
    starts = [_first_line_index(e) for e in outputs]
    by_index = all(s is not None for s in starts)
    lines: dict[tuple[int, int, int], str] = {}
    for output, start in zip(outputs, starts, strict=True):
        for offset, line in enumerate(output.lines):
            if by_index:
                assert start is not None
                key = (output.attempt, start + offset, 0)
            else:
                key = (output.attempt, output.batch, offset)
            lines.setdefault(key, line.rstrip("\r\n"))
    return "".join(lines[k] + "\n" for k in sorted(lines)).encode()


def _first_line_index(event: AgentOutput) -> int | None:
    tail = event.event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None
