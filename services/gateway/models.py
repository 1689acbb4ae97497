"""The HTTP API's request and response types: they validate requests and generate OpenAPI."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from shared.events import ErrorInfo, FilesRef, OutputSpec, RepoSpec, TaskSpec
from shared.inputs import MAX_FILES
from shared.secrets import SECRET_NAME_PATTERN

# What reaches the CLI's command line: an argument cannot hold a NUL byte, and a model or tool
# name has no business holding any control character.
Prompt = Annotated[str, Meta(min_length=1, max_length=100_000, pattern=r"^[^\x00]*$")]
TimeoutS = Annotated[int, Meta(ge=1, le=3600)]
MaxTurns = Annotated[int, Meta(ge=1, le=500)]
Model = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
ToolName = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
MetaKey = Annotated[str, Meta(min_length=1, max_length=128)]
MetaValue = Annotated[str, Meta(max_length=1024)]
Metadata = Annotated[dict[MetaKey, MetaValue], Meta(max_length=32)]
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000_000)]
MaxBudgetUsd = Annotated[float, Meta(gt=0, le=100_000)]
RepoUrl = Annotated[str, Meta(min_length=1, max_length=2048, pattern=r"^[^\x00-\x20\x7f]+$")]
GitRef = Annotated[
    str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/+@-]*$")
]
Depth = Annotated[int, Meta(ge=1, le=1_000_000)]
SecretName = Annotated[str, Meta(pattern=SECRET_NAME_PATTERN)]
ArtifactPattern = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
REPO_SCHEMES = ("https", "http", "ssh", "git", "file")


class RepoRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``repo`` of ``POST /v1/tasks``: checked out into the workspace before the agent runs."""

    url: RepoUrl
    ref: GitRef | None = None
    depth: Depth | None = None
    credential: SecretName | None = None

    def spec(self) -> RepoSpec:
        return RepoSpec(url=self.url, ref=self.ref, depth=self.depth, credential=self.credential)


class FileRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One of ``files``: placed in the workspace before the run, over the checkout."""

    path: Annotated[str, Meta(min_length=1, max_length=1024)]
    content_b64: str
    mode: Literal["0644", "0755"] = "0644"


class OutputRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``output`` of ``POST /v1/tasks``: what comes back besides ``result.json``."""

    branch: GitRef | None = None
    push: bool = False
    artifacts: Annotated[list[ArtifactPattern], Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )

    def spec(self) -> OutputSpec:
        return OutputSpec(branch=self.branch, push=self.push, artifacts=list(self.artifacts))


def _bad_ref(ref: str) -> bool:
    """What ``git check-ref-format`` refuses beyond the pattern of :data:`GitRef`."""
    parts = ref.split("/")
    return (
        ".." in ref
        or "@{" in ref
        or ref == "@"
        or any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)
        or ref.endswith(".")
    )


def task_problem(task: TaskRequest, *, allow_file: bool) -> tuple[str, str] | None:
    """What is wrong with a task beyond its types: ``(field, message)``, or ``None``."""
    if task.repo is not None and (problem := repo_problem(task.repo, allow_file=allow_file)):
        return problem
    output = task.output
    if output is None:
        return None
    if task.repo is None and (output.branch or output.push):
        return "output", "output.branch and output.push need a repo to make the branch from"
    for i, pattern in enumerate(output.artifacts):
        if pattern.startswith("/") or ".." in pattern.split("/"):
            return f"output.artifacts[{i}]", (
                "an artifact pattern is relative to the workspace, without '..' parts"
            )
    if output.push and not output.branch:
        return "output.push", "output.push needs output.branch: the branch to push"
    if output.branch and (_bad_ref(output.branch) or output.branch == "HEAD"):
        return "output.branch", f"output.branch {output.branch!r} is not a valid branch name"
    return None


def repo_problem(repo: RepoRequest, *, allow_file: bool) -> tuple[str, str] | None:
    """What is wrong with ``repo`` beyond its types: ``(field, message)``, or ``None``."""
    try:
        url = urlsplit(repo.url)
        url.port  # noqa: B018 (a malformed port raises here)
    except ValueError as exc:
        return "repo.url", f"repo.url is not a URL: {exc}"
    scheme = url.scheme.lower()
    if scheme not in REPO_SCHEMES:
        return "repo.url", f"repo.url must be an {', '.join(REPO_SCHEMES[:-1])} URL"
    if scheme == "file" and not allow_file:
        return "repo.url", "file:// repositories are off here (SANDSTREAM_ALLOW_FILE_REPOS=1)"
    if scheme != "file" and not url.hostname:
        return "repo.url", "repo.url names no host"
    if url.password is not None or (url.username and scheme in ("http", "https")):
        return (
            "repo.url",
            "repo.url carries credentials: store them as a secret, name it in repo.credential",
        )
    if url.query or url.fragment:
        return "repo.url", "repo.url cannot have a query or a fragment"
    if repo.ref is not None and _bad_ref(repo.ref):
        return "repo.ref", f"repo.ref {repo.ref!r} is not a valid git ref name"
    return None


class TaskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/tasks``."""

    prompt: Prompt
    timeout_s: TimeoutS = 600
    max_turns: MaxTurns | None = None
    model: Model | None = None
    allowed_tools: Annotated[list[ToolName], Meta(max_length=64)] | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    max_tokens: MaxTokens | None = None
    max_budget_usd: MaxBudgetUsd | None = None
    repo: RepoRequest | None = None
    files: Annotated[list[FileRequest], Meta(max_length=MAX_FILES)] | None = None
    output: OutputRequest | None = None

    def spec(self, files: FilesRef | None = None) -> TaskSpec:
        """The task's spec; ``files`` is where the gateway stored :attr:`files`."""
        return TaskSpec(
            repo=self.repo.spec() if self.repo else None,
            files=files,
            output=self.output.spec() if self.output else None,
            prompt=self.prompt,
            timeout_s=self.timeout_s,
            max_turns=self.max_turns,
            model=self.model,
            allowed_tools=self.allowed_tools,
            metadata=self.metadata,
            max_tokens=self.max_tokens,
            max_budget_usd=self.max_budget_usd,
        )


class ExecuteRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /execute``: the seed's synchronous form."""

    task: Prompt
    auth_token: str | None = None
    timeout_s: TimeoutS = 600
    max_turns: MaxTurns | None = None
    model: Model | None = None
    allowed_tools: Annotated[list[ToolName], Meta(max_length=64)] | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    max_tokens: MaxTokens | None = None
    max_budget_usd: MaxBudgetUsd | None = None

    def as_task(self) -> TaskRequest:
        return TaskRequest(
            prompt=self.task,
            timeout_s=self.timeout_s,
            max_turns=self.max_turns,
            model=self.model,
            allowed_tools=self.allowed_tools,
            metadata=self.metadata,
            max_tokens=self.max_tokens,
            max_budget_usd=self.max_budget_usd,
        )


class Links(msgspec.Struct):
    self: str
    events: str
    result: str


class Accepted(msgspec.Struct):
    task_id: str
    status: str
    links: Links


class TaskView(msgspec.Struct, omit_defaults=True):
    task_id: str
    status: str
    created_at: str
    updated_at: str
    metadata: dict[str, str]
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class TaskPage(msgspec.Struct):
    tasks: list[TaskView]
    next_cursor: str | None = None


class ExecuteResponse(msgspec.Struct, omit_defaults=True):
    task_id: str
    status: str
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


_canonical = msgspec.json.Encoder(order="sorted")


def request_hash(request: TaskRequest) -> str:
    """A stable hash of what was asked, to tell an idempotent replay from a conflicting one."""
    return hashlib.sha256(_canonical.encode(request)).hexdigest()


def links(task_id: str) -> Links:
    base = f"/v1/tasks/{task_id}"
    return Links(self=base, events=f"{base}/events", result=f"{base}/result")
