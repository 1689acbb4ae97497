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
    ArtifactsInfo,
    BranchInfo,
    ExecutionCompleted,
    SandboxStopped,
    TaskRequested,
    WorkspacePrepared,
    first_line,
)
from shared.outcome import decide
from shared.results import (
    ArtifactsResult,
    BranchResult,
    RepoInfo,
    TaskResult,
    encode_result,
)


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
    """``result.json`` per docs/api.md; status and error from :func:`shared.outcome.decide`."""
    outcome = decide(history, stopped.task_id, stopped.reason)
    status, error, execution = outcome.status, outcome.error, outcome.execution
    sandbox = stopped.usage
    prepared = next((e for e in history if isinstance(e, WorkspacePrepared)), None)
    requested = next((e for e in history if isinstance(e, TaskRequested)), None)
    parent = requested.spec.follow_up if requested is not None else None
    repo = (
        RepoInfo(url=prepared.url, ref=prepared.ref, commit=prepared.commit) if prepared else None
    )
    if execution is None:
        return TaskResult(
            task_id=stopped.task_id,
            status=status,
            is_error=True,
            sandbox=sandbox,
            error=error,
            repo=repo,
            parent_task_id=parent,
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
        repo=repo,
        branch=_branch(execution.branch),
        artifacts=_artifacts(execution.artifacts),
        network=execution.network,
        warnings=list(execution.warnings),
        structured_output=execution.structured_output,
        parent_task_id=parent,
    )


def _artifacts(artifacts: ArtifactsInfo | None) -> ArtifactsResult | None:
    if artifacts is None:
        return None
    stored = artifacts.object
    if stored is None:
        return ArtifactsResult(files=list(artifacts.files))
    return ArtifactsResult(
        files=list(artifacts.files), key=stored.key, size=stored.size, sha256=stored.sha256
    )


def _branch(branch: BranchInfo | None) -> BranchResult | None:
    if branch is None:
        return None
    return BranchResult(
        name=branch.name, commit=branch.commit, base=branch.base, pushed=branch.pushed
    )


def build_transcript(history: Sequence[AnyEvent]) -> bytes:
    """Every ``AgentOutput`` line once, in order, one per line (JSON Lines).

    Batches are ordered by their first line's index (``AgentOutput.first_line``); a line
    delivered twice (a re-published or overlapping batch) is written once. Batches that do not
    say where they start fall back to ``batch``.
    """
    outputs = [e for e in history if isinstance(e, AgentOutput)]
    starts = [first_line(e) for e in outputs]
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
