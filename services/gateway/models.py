"""The HTTP API's request and response types: they validate requests and generate OpenAPI."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from shared import egress
from shared.events import (
    TASK_ID_PATTERN,
    AgentConfig,
    ErrorInfo,
    FilesRef,
    McpServer,
    NetworkSpec,
    OutputSpec,
    RepoSpec,
    TaskSpec,
)
from shared.inputs import MAX_FILES, MAX_PATH, PATH_PATTERN, path_problem
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
# What the next fields accept is one regular expression each, used twice: in the OpenAPI
# document (so a client, or the fuzzer, knows exactly what passes) and by the checks below,
# which run it and, when it fails, say why in words.
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_PORT = (
    r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
    r"|[1-9][0-9]{0,3}))?"
)
_URL_PATH = r"(?:/[A-Za-z0-9._~!$&'()*+,;=:%/-]*)?"
REPO_URL_PATTERN = (
    rf"^(?:https?://{_HOST}{_PORT}|git://{_HOST}{_PORT}|ssh://(?:[A-Za-z0-9._-]+@)?{_HOST}{_PORT})"
    rf"{_URL_PATH}$"
)
FILE_URL_PATTERN = r"^file:///[A-Za-z0-9._~!$&'()*+,;=:%/-]*$"
_REF_PART = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"
GIT_REF_PATTERN = rf"^[A-Za-z0-9_](?:[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*)(?:/{_REF_PART})*$"
_CHAR = r"[^/\x00-\x1f\x7f]"
_NO_DOT = r"[^/.\x00-\x1f\x7f]"
_PART = (  # a path part that is not "." or ".."
    rf"(?:{_NO_DOT}{_CHAR}*|\.{_NO_DOT}{_CHAR}*|\.\.{_CHAR}+)"
)
ARTIFACT_PATTERN = rf"^{_PART}(?:/{_PART})*$"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ALLOW_ENTRY_PATTERN = rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*{_PORT}$"
"""A ``network.allow`` entry: a host name, ``*.domain`` or IPv4 address, maybe ``:port``
(``preset:<name>`` entries are the installation's, checked against its presets)."""
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

RepoUrl = Annotated[
    str, Meta(min_length=1, max_length=2048, extra_json_schema={"pattern": REPO_URL_PATTERN})
]
GitRef = Annotated[
    str, Meta(min_length=1, max_length=255, extra_json_schema={"pattern": GIT_REF_PATTERN})
]
Depth = Annotated[int, Meta(ge=1, le=1_000_000)]
SecretName = Annotated[str, Meta(pattern=SECRET_NAME_PATTERN)]
ArtifactPattern = Annotated[
    str, Meta(min_length=1, max_length=256, extra_json_schema={"pattern": ARTIFACT_PATTERN})
]
FilePath = Annotated[
    str, Meta(min_length=1, max_length=MAX_PATH, extra_json_schema={"pattern": PATH_PATTERN})
]
AllowEntry = Annotated[
    str, Meta(min_length=1, max_length=253, extra_json_schema={"pattern": ALLOW_ENTRY_PATTERN})
]
Base64 = Annotated[
    str, Meta(extra_json_schema={"pattern": BASE64_PATTERN, "contentEncoding": "base64"})
]


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

    path: FilePath
    content_b64: Base64
    mode: Literal["0644", "0755"] = "0644"


LongText = Annotated[str, Meta(max_length=100_000, pattern=r"^[^\x00]*$")]
McpName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Arg = Annotated[str, Meta(max_length=256, pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
MAX_JSON_OPTION_BYTES: Final = 64 * 1024
"""``settings`` and ``json_schema`` each, encoded."""


class McpServerRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A stdio MCP server (it runs inside the sandbox, as the agent)."""

    type: Literal["stdio"] = "stdio"
    command: Annotated[str, Meta(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")]
    args: Annotated[list[Arg], Meta(max_length=16)] = msgspec.field(default_factory=list)
    env: Annotated[dict[EnvName, Arg], Meta(max_length=16)] = msgspec.field(default_factory=dict)

    def spec(self) -> McpServer:
        return McpServer(command=self.command, args=list(self.args), env=dict(self.env))


class NetworkRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``network`` of ``POST /v1/tasks``: the hosts the agent may reach (default: none)."""

    allow: Annotated[list[AllowEntry], Meta(max_length=64)]

    def spec(self) -> NetworkSpec:
        return NetworkSpec(allow=list(self.allow))


class OutputRequest(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
):
    """``output`` of ``POST /v1/tasks``: what comes back besides ``result.json``."""

    branch: GitRef | None = None
    push: bool = False
    artifacts: Annotated[list[ArtifactPattern], Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )

    def spec(self) -> OutputSpec:
        return OutputSpec(branch=self.branch, push=self.push, artifacts=list(self.artifacts))


CROSS_FIELD_RULES: Final = [
    {  # a follow-up takes no repo
        "if": {"required": ["follow_up"], "properties": {"follow_up": {"type": "string"}}},
        "then": {"properties": {"repo": {"type": "null"}}},
    },
    {  # output.branch needs a repo
        "if": {
            "required": ["output"],
            "properties": {
                "output": {
                    "type": "object",
                    "required": ["branch"],
                    "properties": {"branch": {"type": "string"}},
                }
            },
        },
        "then": {"required": ["repo"], "properties": {"repo": {"type": "object"}}},
    },
    {  # output.push needs output.branch
        "if": {
            "required": ["output"],
            "properties": {
                "output": {
                    "type": "object",
                    "required": ["push"],
                    "properties": {"push": {"const": True}},
                }
            },
        },
        "then": {
            "properties": {
                "output": {"required": ["branch"], "properties": {"branch": {"type": "string"}}}
            }
        },
    },
]
"""The rules between fields, for the OpenAPI document (``task_problem`` checks them)."""


def task_problem(
    task: TaskRequest, *, allow_file: bool, presets: Mapping[str, Sequence[str]]
) -> tuple[str, str] | None:
    """What is wrong with a task beyond its types: ``(field, message)``, or ``None``."""
    if task.repo is not None and (problem := repo_problem(task.repo, allow_file=allow_file)):
        return problem
    if task.follow_up is not None and task.repo is not None:
        return "repo", "a follow-up goes on from the earlier task's workspace: it takes no repo"
    if task.network is not None and (problem := network_problem(task.network, presets)):
        return problem
    for name in ("settings", "json_schema"):
        value = getattr(task, name)
        if value is not None and len(msgspec.json.encode(value)) > MAX_JSON_OPTION_BYTES:
            return name, f"{name} holds more than {MAX_JSON_OPTION_BYTES} bytes of JSON"
    for i, item in enumerate(task.files or ()):
        if why := path_problem(item.path):
            return f"files[{i}].path", f"files[{i}].path: {why}"
        if not re.fullmatch(BASE64_PATTERN, item.content_b64):
            return f"files[{i}].content_b64", f"files[{i}].content_b64 is not base64"
    output = task.output
    if output is None:
        return None
    if output.branch is not None and not re.fullmatch(GIT_REF_PATTERN, output.branch):
        return "output.branch", f"output.branch {output.branch!r} is not a branch name git takes"
    if output.push and output.branch is None:
        return "output.push", "output.push needs output.branch: the branch to push"
    if output.branch is not None and task.repo is None:
        return "output.branch", "output.branch needs a repo to make the branch from"
    for i, pattern in enumerate(output.artifacts):
        if not re.fullmatch(ARTIFACT_PATTERN, pattern):
            return f"output.artifacts[{i}]", (
                "an artifact pattern is relative to the workspace, without empty, '.' or '..' "
                "parts or control characters"
            )
    return None


def network_problem(
    network: NetworkRequest, presets: Mapping[str, Sequence[str]]
) -> tuple[str, str] | None:
    """The first ``network.allow`` entry that is neither :data:`ALLOW_ENTRY_PATTERN` nor a
    preset of this installation."""
    for i, entry in enumerate(network.allow):
        if entry.startswith(egress.PRESET_PREFIX):
            if entry.removeprefix(egress.PRESET_PREFIX) in presets:
                continue
            known = ", ".join(sorted(presets)) or "none are set here"
            why = f"no such preset (SANDSTREAM_EGRESS_PRESETS: {known})"
        elif re.fullmatch(ALLOW_ENTRY_PATTERN, entry):
            continue
        else:
            why = "a host name, *.domain or IPv4 address, maybe with :port (1-65535)"
        return f"network.allow[{i}]", f"network.allow[{i}] {entry!r}: {why}"
    return None


def repo_problem(repo: RepoRequest, *, allow_file: bool) -> tuple[str, str] | None:
    """What is wrong with ``repo`` beyond its types: ``(field, message)``, or ``None``."""
    url = repo.url
    if url.startswith("file:"):
        if not allow_file:
            return "repo.url", "file:// repositories are off here (SANDSTREAM_ALLOW_FILE_REPOS=1)"
        if not re.fullmatch(FILE_URL_PATTERN, url):
            return "repo.url", "repo.url must be file:///absolute/path"
    elif not re.fullmatch(REPO_URL_PATTERN, url):
        return "repo.url", _url_problem(url)
    if repo.ref is not None and not re.fullmatch(GIT_REF_PATTERN, repo.ref):
        return "repo.ref", f"repo.ref {repo.ref!r} is not a branch, tag or commit name git takes"
    return None


def _url_problem(url: str) -> str:
    """Why a URL does not match :data:`REPO_URL_PATTERN`, in words."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"repo.url is not a URL: {exc}"
    if parts.scheme.lower() not in ("https", "http", "git", "ssh"):
        return "repo.url must be an https, http, git or ssh URL"
    if ("@" in parts.netloc and parts.scheme != "ssh") or parts.password is not None:
        return "repo.url carries credentials: store them as a secret and name it in repo.credential"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "repo.url cannot have a query or a fragment"
    if not parts.hostname:
        return "repo.url names no host"
    return "repo.url is not a URL git takes here (host name, port 1-65535, plain path characters)"


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
    network: NetworkRequest | None = None
    append_system_prompt: LongText | None = None
    claude_md: LongText | None = None
    settings: Annotated[dict[str, Any], Meta(max_length=256)] | None = None
    mcp_servers: Annotated[dict[McpName, McpServerRequest], Meta(max_length=8)] | None = None
    json_schema: Annotated[dict[str, Any], Meta(max_length=256)] | None = None
    disallowed_tools: Annotated[list[ToolName], Meta(max_length=64)] | None = None
    stall_timeout_s: Annotated[int, Meta(ge=10, le=3600)] = 300
    fail_on_permission_denial: bool = False
    follow_up: (
        Annotated[
            str,
            Meta(
                pattern=TASK_ID_PATTERN,
                description="an ended task of yours to continue from",
                examples=["t_b7kqxz2m4n5p6r7s3t4u"],
            ),
        ]
        | None
    ) = None

    def spec(self, files: FilesRef | None = None) -> TaskSpec:
        """The task's spec; ``files`` is where the gateway stored :attr:`files`."""
        return TaskSpec(
            repo=self.repo.spec() if self.repo else None,
            files=files,
            output=self.output.spec() if self.output else None,
            network=self.network.spec() if self.network else None,
            agent=self._agent(),
            follow_up=self.follow_up,
            prompt=self.prompt,
            timeout_s=self.timeout_s,
            max_turns=self.max_turns,
            model=self.model,
            allowed_tools=self.allowed_tools,
            metadata=self.metadata,
            max_tokens=self.max_tokens,
            max_budget_usd=self.max_budget_usd,
        )

    def _agent(self) -> AgentConfig | None:
        config = AgentConfig(
            append_system_prompt=self.append_system_prompt,
            claude_md=self.claude_md,
            settings=self.settings,
            mcp_servers={k: v.spec() for k, v in self.mcp_servers.items()}
            if self.mcp_servers
            else None,
            json_schema=self.json_schema,
            disallowed_tools=self.disallowed_tools,
            fail_on_permission_denial=self.fail_on_permission_denial,
            stall_timeout_s=self.stall_timeout_s,
        )
        return None if config == AgentConfig() else config


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
    warnings: list[str] | None = None


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
