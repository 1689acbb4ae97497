"""Every event of the TASKS stream, as msgspec Structs in one tagged union.

Wire rules (they are the public contract, see docs/api.md):

- ``type`` is the tag and an explicit, stable string, never derived from a class name;
- every event carries the envelope ``event_id``, ``task_id``, ``tenant``, ``at``, ``v`` and
  ``causation_id``;
- new fields always get defaults and field types never change, so old events stay readable.

Event ids are deterministic (``<task_id>:<EventType>:<attempt>``, and ``<task_id>:terminal`` for
whichever event ends a task): the id is the ``Nats-Msg-Id``, so a re-publish is dropped by the
stream's duplicate window.
"""

from __future__ import annotations

import base64
import re
import secrets
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

import msgspec

SCHEMA_VERSION: Final = 1


def now() -> datetime:
    return datetime.now(UTC)


TASK_ID_PATTERN: Final = r"^t_[a-z2-7]{20}$"
_TASK_ID = re.compile(r"t_[a-z2-7]{20}")


def is_task_id(value: str) -> bool:
    """Whether ``value`` has the form of a task id (what :func:`new_task_id` makes)."""
    return _TASK_ID.fullmatch(value) is not None


def new_task_id() -> str:
    """A task id: ``t_`` and 20 lowercase base32 characters (100 random bits).

    Safe in NATS subjects, container names and object keys.
    """
    return "t_" + base64.b32encode(secrets.token_bytes(13)).decode()[:20].lower()


class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="type"):
    """The envelope every event carries."""

    event_id: str
    task_id: str
    tenant: str
    at: datetime = msgspec.field(default_factory=now)
    v: int = SCHEMA_VERSION
    causation_id: str | None = None


class RepoSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """A git repository to check out into the workspace before the agent starts."""

    url: str
    """Without credentials (the gateway refuses a URL that carries any)."""
    ref: str | None = None
    """Branch, tag or full commit id; ``None``: the remote's HEAD."""
    depth: int | None = None
    credential: str | None = None
    """Name of a tenant secret, used as the HTTP password; only the executor reads it."""


class FilesRef(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """The task's inline ``files``, as one tar the gateway stored (they can be larger than an
    event): the executor reads it by key and checks its sha256 before unpacking it."""

    key: str
    sha256: str
    size: int
    count: int


class NetworkSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """The hosts the agent may reach through the egress proxy (``shared.egress``)."""

    allow: list[str]


class OutputSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """What the task gives back besides ``result.json`` (needs a ``repo``)."""

    branch: str | None = None
    """A branch made of the agent's changes: one commit on top of the checked-out commit."""
    push: bool = False
    """Push that branch to the repository's origin (with ``repo.credential``)."""
    artifacts: list[str] = msgspec.field(default_factory=list)
    """Shell patterns of workspace paths stored as ``artifacts.tar.gz`` after the run."""


class McpServer(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """A stdio MCP server: a command the CLI starts inside the sandbox."""

    command: str
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """The task's configuration of the CLI (each reaches it as its documented flag or file)."""

    append_system_prompt: str | None = None
    claude_md: str | None = None
    settings: dict[str, Any] | None = None
    mcp_servers: dict[str, McpServer] | None = None
    json_schema: dict[str, Any] | None = None
    disallowed_tools: list[str] | None = None
    fail_on_permission_denial: bool = False
    stall_timeout_s: int = 300


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """What the user asked for (the validated body of ``POST /v1/tasks``)."""

    prompt: str
    timeout_s: int = 600
    max_turns: int | None = None
    model: str | None = None
    allowed_tools: list[str] | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    max_tokens: int | None = None
    """Cap on the run's model tokens (input, cache and output), enforced by the model proxy."""
    max_budget_usd: float | None = None
    """Cap on the run's model cost, priced by the model proxy from the upstream's usage."""
    repo: RepoSpec | None = None
    files: FilesRef | None = None
    output: OutputSpec | None = None
    network: NetworkSpec | None = None
    agent: AgentConfig | None = None
    """How the CLI is configured for the run, beyond its prompt (``agent.py``)."""
    follow_up: str | None = None
    """The earlier task (same tenant, ended) whose workspace and session this one goes on
    from."""


class ModelUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What a task's model calls used, as the model proxy counted them from the upstream's
    answers (never from what the agent reports)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


class Usage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Resources a sandbox used, read from its cgroup at the end."""

    image: str = ""
    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0
    wall_ms: int = 0


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    code: str
    message: str


class StoredObject(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    key: str
    size: int
    sha256: str


class ArtifactsInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The workspace files that matched ``output.artifacts``, stored as one tar.gz."""

    files: list[str]
    """Their paths (the first 1,000); empty when nothing matched (then nothing is stored)."""
    object: StoredObject | None = None


class HostTraffic(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    host: str
    requests: int = 0
    bytes: int = 0


class HostRefusals(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    host: str
    port: int
    count: int = 0


class NetworkInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the egress proxy let through and refused for the run (its counts)."""

    allowed: list[HostTraffic] = msgspec.field(default_factory=list)
    blocked: list[HostRefusals] = msgspec.field(default_factory=list)


class BranchInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The branch made of the agent's changes (``output.branch``)."""

    name: str
    commit: str | None = None
    """``None`` when the agent changed nothing: no commit, no bundle, nothing pushed."""
    base: str = ""
    """The checked-out commit the branch's one commit is on top of."""
    pushed: bool = False
    bundle: StoredObject | None = None
    """``changes.bundle``: a git bundle of the branch (prerequisite: ``base``)."""


# ---- the events ---------------------------------------------------------------------------


class TaskRequested(Event, frozen=True, kw_only=True, tag="TaskRequested"):
    spec: TaskSpec
    idempotency_key: str | None = None
    request_hash: str = ""


class SandboxStarted(Event, frozen=True, kw_only=True, tag="SandboxStarted"):
    sandbox: str
    image: str
    attempt: int = 1


class ExecutionStarted(Event, frozen=True, kw_only=True, tag="ExecutionStarted"):
    """The executor claimed the one agent run of this attempt (the lock against a second run)."""

    sandbox: str
    attempt: int = 1


class AgentOutput(Event, frozen=True, kw_only=True, tag="AgentOutput"):
    """A batch of the CLI's stream-json lines, in order; ``batch`` counts from 0."""

    batch: int
    lines: list[str]
    attempt: int = 1
    output_bytes: int = 0
    """The run's output so far in bytes, this batch included (what the output cap counts)."""
    first_line: int | None = None
    """Index in the run's output file of this batch's first line (also the last part of the
    event id). ``None`` only in events written before the field existed: see
    :func:`first_line`."""


class WorkspacePrepared(Event, frozen=True, kw_only=True, tag="WorkspacePrepared"):
    """The workspace was filled before the agent started (published once it is in the
    sandbox; the agent starts only after it, so a redelivery never fills it twice)."""

    url: str = ""
    ref: str = ""
    """The ref asked for (``HEAD`` when none was)."""
    commit: str = ""
    """The checked-out commit: the diff and the branch are against it."""
    bytes: int = 0
    """Size of what was copied in (work tree and ``.git``)."""
    ms: int = 0
    """Time to fetch, check out and copy in."""
    files: int = 0
    """Inline files placed after the checkout (overriding it)."""
    resume: str = ""
    """A follow-up's: the CLI session it continues (``--resume``)."""


class EgressBlocked(Event, frozen=True, kw_only=True, tag="EgressBlocked"):
    """The egress proxy refused the agent a host (one event per host, port and task)."""

    host: str
    port: int
    reason: str
    count: int = 1
    """Refusals counted when this was published."""


class BranchPushed(Event, frozen=True, kw_only=True, tag="BranchPushed"):
    """The branch of the agent's changes is on the origin (published once it is): a
    redelivery never pushes again."""

    url: str
    branch: str
    commit: str


class ExecutionCompleted(Event, frozen=True, kw_only=True, tag="ExecutionCompleted"):
    text: str
    is_error: bool
    exit_code: int
    num_turns: int = 0
    total_cost_usd: float = 0.0
    usage: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str = ""
    permission_denials: list[dict[str, Any]] = msgspec.field(default_factory=list)
    duration_ms: int = 0
    diff: str = ""
    files_changed: list[str] = msgspec.field(default_factory=list)
    model_usage: ModelUsage = msgspec.field(default_factory=ModelUsage)
    attempt: int = 1
    branch: BranchInfo | None = None
    artifacts: ArtifactsInfo | None = None
    network: NetworkInfo | None = None
    warnings: list[str] = msgspec.field(default_factory=list)
    """What did not go as asked though the run may have succeeded: ``permission_denied``,
    ``empty_result``, ``max_turns_reached``, ``stopped_after_result``."""
    structured_output: Any = None
    kept: list[StoredObject] = msgspec.field(default_factory=list)
    """``workspace.tar.gz`` and ``session.tar.gz``: what a follow-up goes on from."""


class ExecutionFailed(Event, frozen=True, kw_only=True, tag="ExecutionFailed"):
    """The agent could not produce a successful result.

    ``code`` is one of ``no_credential``, ``cli_error``, ``timeout``, ``sandbox_lost``,
    ``oom``, ``pids_limit``, ``budget_exceeded``, ``output_limit``, ``cancelled``, ``internal``.
    """

    code: str
    message: str
    exit_code: int | None = None
    text: str = ""
    num_turns: int = 0
    total_cost_usd: float = 0.0
    usage: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str = ""
    permission_denials: list[dict[str, Any]] = msgspec.field(default_factory=list)
    duration_ms: int = 0
    diff: str = ""
    files_changed: list[str] = msgspec.field(default_factory=list)
    model_usage: ModelUsage = msgspec.field(default_factory=ModelUsage)
    attempt: int = 1
    branch: BranchInfo | None = None
    artifacts: ArtifactsInfo | None = None
    network: NetworkInfo | None = None
    warnings: list[str] = msgspec.field(default_factory=list)
    """What did not go as asked though the run may have succeeded: ``permission_denied``,
    ``empty_result``, ``max_turns_reached``, ``stopped_after_result``."""
    structured_output: Any = None
    kept: list[StoredObject] = msgspec.field(default_factory=list)
    """``workspace.tar.gz`` and ``session.tar.gz``: what a follow-up goes on from."""


class SandboxStopped(Event, frozen=True, kw_only=True, tag="SandboxStopped"):
    sandbox: str
    reason: str
    usage: Usage = msgspec.field(default_factory=Usage)


ResultStatus: TypeAlias = Literal["succeeded", "failed", "cancelled", "timed_out"]


class ResultStored(Event, frozen=True, kw_only=True, tag="ResultStored"):
    status: ResultStatus
    location: str
    objects: list[StoredObject]
    error: ErrorInfo | None = None
    """Why the task did not succeed, as ``result.json`` says (``shared/outcome.py``): the
    lifecycle copies it into ``TaskFailed``. ``None`` on success (and in older events)."""


class StorageFailed(Event, frozen=True, kw_only=True, tag="StorageFailed"):
    """Storage gave up on the task's result (its store kept failing); the lifecycle ends the
    task ``failed`` with this error. Only the lifecycle publishes terminal events."""

    error: ErrorInfo


class TaskCancelRequested(Event, frozen=True, kw_only=True, tag="TaskCancelRequested"):
    reason: str = "requested by the client"


class TaskSucceeded(Event, frozen=True, kw_only=True, tag="TaskSucceeded"):
    pass


class TaskFailed(Event, frozen=True, kw_only=True, tag="TaskFailed"):
    error: ErrorInfo


class TaskCancelled(Event, frozen=True, kw_only=True, tag="TaskCancelled"):
    reason: str = ""


class TaskTimedOut(Event, frozen=True, kw_only=True, tag="TaskTimedOut"):
    timeout_s: int


AnyEvent: TypeAlias = (
    TaskRequested
    | SandboxStarted
    | WorkspacePrepared
    | ExecutionStarted
    | AgentOutput
    | EgressBlocked
    | BranchPushed
    | ExecutionCompleted
    | ExecutionFailed
    | SandboxStopped
    | ResultStored
    | StorageFailed
    | TaskCancelRequested
    | TaskSucceeded
    | TaskFailed
    | TaskCancelled
    | TaskTimedOut
)

EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    TaskRequested,
    SandboxStarted,
    WorkspacePrepared,
    ExecutionStarted,
    AgentOutput,
    EgressBlocked,
    BranchPushed,
    ExecutionCompleted,
    ExecutionFailed,
    SandboxStopped,
    ResultStored,
    StorageFailed,
    TaskCancelRequested,
    TaskSucceeded,
    TaskFailed,
    TaskCancelled,
    TaskTimedOut,
)

TERMINAL_TYPES: Final = (TaskSucceeded, TaskFailed, TaskCancelled, TaskTimedOut)
TerminalEvent: TypeAlias = TaskSucceeded | TaskFailed | TaskCancelled | TaskTimedOut

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def type_name(event_cls: type[Event]) -> str:
    tag = event_cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


WITHOUT_OUTPUT: Final = tuple(type_name(t) for t in EVENT_TYPES if t is not AgentOutput)
"""Every event type but the output batches: what services read of a task to decide on it
(output is most of a long task's history)."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode one event; raises ``msgspec.ValidationError``/``DecodeError`` on bad data."""
    return _decoder.decode(data)


def event_id(task_id: str, event_type: str, attempt: int | str = 1) -> str:
    return f"{task_id}:{event_type}:{attempt}"


def terminal_id(task_id: str) -> str:
    """One id for every kind of ending: the duplicate window drops a second ending."""
    return f"{task_id}:terminal"


def is_terminal(event: Event) -> bool:
    return isinstance(event, TERMINAL_TYPES)


def event_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event, keyed by its type name."""
    out: dict[str, dict[str, Any]] = {}
    for cls in EVENT_TYPES:
        out[type_name(cls)] = msgspec.json.schema(cls)
    return out


def first_line(output: AgentOutput) -> int | None:
    """Index in the run's output file of a batch's first line: its field, or for a batch
    written before the field existed, the last part of its id; ``None`` if neither says."""
    if output.first_line is not None:
        return output.first_line
    tail = output.event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None
