"""The stored result of a task (``tasks/<task_id>/result.json``), as docs/api.md defines it.

The storage service writes it; the gateway serves it (``GET /v1/tasks/{id}/result``). Its JSON
Schema (:func:`result_schema`) is generated from :class:`TaskResult`, like the events' schemas.
Object keys are deterministic and named by the task, so a redelivery overwrites the same objects.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from shared.events import ErrorInfo, ModelUsage, NetworkInfo, ResultStatus, Usage

RESULT_FILE: Final = "result.json"
TRANSCRIPT_FILE: Final = "transcript.jsonl"
DIFF_FILE: Final = "diff.patch"
BUNDLE_FILE: Final = "changes.bundle"
ARTIFACTS_FILE: Final = "artifacts.tar.gz"
WORKSPACE_FILE: Final = "workspace.tar.gz"
SESSION_FILE: Final = "session.tar.gz"
"""These four are written by the executor; the others by storage."""

CONTENT_TYPES: Final = {
    RESULT_FILE: "application/json",
    TRANSCRIPT_FILE: "application/x-ndjson",
    DIFF_FILE: "text/x-diff; charset=utf-8",
    BUNDLE_FILE: "application/x-git-bundle",
    ARTIFACTS_FILE: "application/gzip",
    WORKSPACE_FILE: "application/gzip",
    SESSION_FILE: "application/gzip",
}


class RepoInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The repository the workspace was checked out from (``WorkspacePrepared``)."""

    url: str
    ref: str
    commit: str


class BranchResult(msgspec.Struct, frozen=True, kw_only=True):
    """The branch of the agent's changes (``output.branch``); ``commit`` is ``None`` when
    there were none."""

    name: str
    commit: str | None
    base: str
    pushed: bool


class ArtifactsResult(msgspec.Struct, frozen=True, kw_only=True):
    """``output.artifacts``: ``key``/``size``/``sha256`` of ``artifacts.tar.gz`` (absent when
    nothing matched) and the paths in it."""

    files: list[str]
    key: str | None = None
    size: int = 0
    sha256: str = ""


class TaskResult(msgspec.Struct, frozen=True, kw_only=True):
    """``result.json``: the outcome of one task, with the agent's final answer and usage."""

    task_id: str
    status: ResultStatus
    text: str = ""
    is_error: bool = False
    exit_code: int | None = None
    num_turns: int = 0
    total_cost_usd: float = 0.0
    usage: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str = ""
    permission_denials: list[dict[str, Any]] = msgspec.field(default_factory=list)
    duration_ms: int = 0
    diff: str = ""
    files_changed: list[str] = msgspec.field(default_factory=list)
    sandbox: Usage = msgspec.field(default_factory=Usage)
    """The sandbox the task ran in and what it used (from the lifecycle's ``SandboxStopped``)."""
    model_usage: ModelUsage = msgspec.field(default_factory=ModelUsage)
    """The model calls as the model proxy counted them (``total_cost_usd`` and ``usage`` are
    what the agent's CLI reported)."""
    error: ErrorInfo | None = None
    repo: RepoInfo | None = None
    """Set when the task had a ``repo``: ``diff`` and ``files_changed`` are against ``commit``."""
    branch: BranchResult | None = None
    artifacts: ArtifactsResult | None = None
    network: NetworkInfo | None = None
    """For a task with ``network``: hosts reached (requests, bytes) and refused (count)."""
    warnings: list[str] = msgspec.field(default_factory=list)
    structured_output: Any = None
    parent_task_id: str | None = None
    """A follow-up's: the task it went on from."""
    """With ``json_schema``: the object the CLI validated against it."""


def task_prefix(task_id: str) -> str:
    """The folder of a task's objects, ending in ``/``."""
    return f"tasks/{task_id}/"


def result_key(task_id: str) -> str:
    return task_prefix(task_id) + RESULT_FILE


def transcript_key(task_id: str) -> str:
    return task_prefix(task_id) + TRANSCRIPT_FILE


def diff_key(task_id: str) -> str:
    return task_prefix(task_id) + DIFF_FILE


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[TaskResult] = msgspec.json.Decoder(TaskResult)


def encode_result(result: TaskResult) -> bytes:
    """Deterministic JSON (the same result always gives the same bytes and sha256)."""
    return _encoder.encode(result)


def decode_result(data: bytes) -> TaskResult:
    """Parse a stored ``result.json``; raises ``msgspec.DecodeError`` on bad data."""
    return _decoder.decode(data)


def result_schema() -> dict[str, Any]:
    """JSON Schema of ``result.json`` (for ``schemas/result.json``)."""
    return msgspec.json.schema(TaskResult)
