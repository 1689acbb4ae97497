"""The state machine a task's events must follow, as one pure function over its history.

:func:`violations` takes one task's events in stream order and says what is wrong with them.
It folds them with :mod:`shared.state` (the one definition of a task's status) and checks the
order docs/flow.md promises on top of what the fold alone enforces:

- the task begins with its one ``TaskRequested``; no event id is stored twice;
- each step happens at most once per attempt: ``SandboxStarted``, ``ExecutionStarted``, the
  execution's end (``ExecutionCompleted`` or ``ExecutionFailed``), ``SandboxStopped``,
  ``ResultStored``; and at most one terminal event;
- causes come before effects: ``SandboxStarted`` → ``ExecutionStarted`` → ``AgentOutput`` →
  ``ExecutionCompleted``; a sandbox stopped for ``completed`` follows ``ExecutionCompleted``;
  ``ResultStored`` follows ``SandboxStopped``; ``TaskSucceeded`` follows a ``ResultStored``
  whose status is ``succeeded``;
- ``AgentOutput`` batches cover the transcript without a gap (an executor restarted mid-run
  goes on from the next line);
- after the terminal event only what docs/flow.md allows: a late ``TaskCancelRequested``
  always; the ``SandboxStopped`` and ``ResultStored`` that follow a timeout, a cancel or a
  failure; and, after an ending other than success, the late events of the execution it cut
  short (the fold ignores them; they stay in the log for audits);
- the stored result's status agrees with the terminal event.

No I/O: the chaos run and its unit tests (``tests/unit/test_chaos_rules.py``) both use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Final

from shared import events as ev
from shared.state import Status, TaskState, apply

_ONCE_PER_ATTEMPT: Final = (
    "SandboxStarted",
    "ExecutionStarted",
    "ExecutionEnded",
    "SandboxStopped",
    "ResultStored",
)
_RESULT_STATUS: Final[dict[type[ev.Event], str]] = {
    ev.TaskSucceeded: "succeeded",
    ev.TaskFailed: "failed",
    ev.TaskCancelled: "cancelled",
    ev.TaskTimedOut: "timed_out",
}
_STATUS_OF_END: Final[dict[type[ev.Event], Status]] = {
    ev.TaskSucceeded: Status.SUCCEEDED,
    ev.TaskFailed: Status.FAILED,
    ev.TaskCancelled: Status.CANCELLED,
    ev.TaskTimedOut: Status.TIMED_OUT,
}
_LATE_EXECUTION: Final = (ev.ExecutionStarted, ev.AgentOutput, ev.ExecutionCompleted)


def _step(event: ev.Event) -> str:
    if isinstance(event, ev.ExecutionCompleted | ev.ExecutionFailed):
        return "ExecutionEnded"
    return ev.type_name(type(event))


def _attempt(event: ev.AnyEvent) -> int:
    return int(getattr(event, "attempt", 1))


def _first_line(event: ev.AgentOutput) -> int | None:
    tail = event.event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def violations(events: Sequence[ev.AnyEvent], *, require_end: bool = True) -> list[str]:  # noqa: C901
    """What is wrong with one task's history (stream order); empty when nothing is.

    With ``require_end`` a history without a terminal event is a violation too (use it once
    the task should have ended). Each message names the rule and the events involved.
    """
    out: list[str] = []
    if not events:
        return ["empty history"] if require_end else []
    if not isinstance(events[0], ev.TaskRequested):
        out.append(f"first event is {_step(events[0])}, not TaskRequested")

    ids = Counter(e.event_id for e in events)
    out += [f"event id {i} stored {n} times" for i, n in sorted(ids.items()) if n > 1]
    requests = sum(isinstance(e, ev.TaskRequested) for e in events)
    if requests > 1:
        out.append(f"{requests} TaskRequested events")

    seen: Counter[tuple[str, int]] = Counter()
    state: TaskState | None = None
    end: ev.Event | None = None
    stored: ev.ResultStored | None = None
    next_line: dict[int, int] = {}
    for index, event in enumerate(events):
        step, attempt = _step(event), _attempt(event)
        where = f"{step} (#{index})"
        prior = {name for (name, a), n in seen.items() if a == attempt and n}
        seen[(step, attempt)] += 1

        if step in _ONCE_PER_ATTEMPT and seen[(step, attempt)] == 2:
            out.append(f"{step} more than once (attempt {attempt})")
        if ev.is_terminal(event):
            if end is not None:
                out.append(f"second terminal event {where} after {_step(end)}")
        elif end is not None and not _allowed_after_end(event, end):
            out.append(f"{where} after the terminal {_step(end)}")

        match event:
            case ev.ExecutionStarted():
                if "SandboxStarted" not in prior:
                    out.append(f"{where} before SandboxStarted")
            case ev.AgentOutput():
                if "ExecutionStarted" not in prior:
                    out.append(f"{where} before ExecutionStarted")
                if "ExecutionEnded" in prior:
                    out.append(f"{where} after the execution ended")
                first = _first_line(event)
                expected = next_line.get(attempt, 0)
                if first is not None:
                    if first > expected:
                        out.append(f"{where} starts at line {first}: lines {expected}.. lost")
                    next_line[attempt] = max(expected, first + len(event.lines))
            case ev.ExecutionCompleted():
                if "ExecutionStarted" not in prior:
                    out.append(f"{where} before ExecutionStarted")
            case ev.ExecutionFailed():
                if "SandboxStarted" not in prior:
                    out.append(f"{where} before SandboxStarted")
            case ev.SandboxStopped():
                if "SandboxStarted" not in prior and end is None:
                    out.append(f"{where} of a sandbox never started, task not ended")
                if event.reason == "completed" and not any(
                    isinstance(e, ev.ExecutionCompleted) for e in events[:index]
                ):
                    out.append(f"{where} with reason 'completed' before ExecutionCompleted")
            case ev.ResultStored():
                if "SandboxStopped" not in prior:
                    out.append(f"{where} before SandboxStopped")
                stored = stored or event
            case ev.StorageFailed():
                if "SandboxStopped" not in prior:
                    out.append(f"{where} before SandboxStopped")
            case ev.TaskSucceeded():
                if stored is None:
                    out.append(f"{where} before ResultStored")
                elif stored.status != "succeeded":
                    out.append(f"{where} but the result was stored as {stored.status!r}")
                if not any(isinstance(e, ev.ExecutionCompleted) for e in events[:index]):
                    out.append(f"{where} without ExecutionCompleted")
            case _:
                pass
        if ev.is_terminal(event) and end is None:
            end = event

        state = apply(state, event)

    if end is None:
        if require_end:
            out.append("no terminal event")
        return out
    if stored is not None and stored.status != _RESULT_STATUS[type(end)]:
        out.append(f"ResultStored status {stored.status!r} but the task ended {_step(end)}")
    if state is None or state.status is not _STATUS_OF_END[type(end)]:
        got = state.status if state is not None else None
        out.append(f"the fold ends in {got}, not in the status of {_step(end)}")
    return out


def _allowed_after_end(event: ev.AnyEvent, end: ev.Event) -> bool:
    """Events that may follow the terminal one (kept for audits; the fold takes only the
    stopped sandbox and the stored result of them, never a status)."""
    if isinstance(event, ev.TaskCancelRequested):
        return True  # a client may ask to cancel a task that has just ended
    if isinstance(end, ev.TaskSucceeded):
        return False  # success is the last step of the normal flow
    if isinstance(event, ev.SandboxStopped | ev.ResultStored):
        return True  # a timeout, cancel or give-up ends first, then stops and stores
    return isinstance(event, (*_LATE_EXECUTION, ev.ExecutionFailed))


def task_status(events: Sequence[ev.AnyEvent]) -> Status | None:
    """The status the fold gives these events (``None``: no ``TaskRequested``)."""
    state: TaskState | None = None
    for event in events:
        state = apply(state, event)
    return state.status if state is not None else None
