"""Settings from the environment (names and defaults: docs/api.md, "Configuration")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from shared import egress

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_IMAGE = "sandstream/sandbox:latest"
DEFAULT_UPSTREAM = "https://api.anthropic.com"
MAX_WARM_POOL = 64


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = DEFAULT_NATS_URL
    nats_nkey: Path | None = None  # this component's nkey seed file
    nats_creds: Path | None = None  # or a credentials file (JWT accounts)
    data_dir: Path = Path(".sandstream")
    tokens_file: Path | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    sandbox_image: str = DEFAULT_IMAGE
    model_upstream: str = DEFAULT_UPSTREAM
    host: str = "127.0.0.1"
    port: int = 8080
    stream: str = "TASKS"
    subject_prefix: str = "tasks"
    stream_replicas: int = 1
    duplicate_window_s: float = 6 * 3600.0
    consumer_prefix: str = ""
    max_concurrent: int = 8
    max_per_tenant: int = 4
    ack_wait_s: float = 10.0
    max_deliver: int = 8
    store_max_deliver: int = 40  # storage's attempts: a store outage is waited out (~17 min)
    socket_dir: Path | None = None
    proxy_socket: Path | None = None  # the model proxy's control socket
    sandbox_memory_mb: int = 1024
    sandbox_cpus: float = 1.0
    sandbox_pids: int = 256
    instance: str = ""
    """Labels this installation's sandboxes (``up`` sets it) so it removes only its own."""
    rate_per_tenant: float = 50.0  # submissions per second (token bucket, burst 2x)
    max_queued_per_tenant: int = 1000  # tasks not yet terminal
    max_waiting: int = 4096  # queued tasks the lifecycle's admission sees at once
    max_streams_per_tenant: int = 64  # open SSE streams
    max_output_bytes: int = 16 * 1024 * 1024  # agent output kept per task
    max_model_body_bytes: int = 8 * 1024 * 1024  # the model proxy's cap on a request body
    max_model_connections: int = 16  # open model connections per task
    allowed_models: tuple[str, ...] = ("claude-*",)  # globs
    allow_server_tools: bool = False  # mcp_servers and server-side tools
    model_prices: str = ""  # JSON: model glob -> USD per million tokens
    secrets_file: Path | None = None  # tenant secrets (repository credentials): the executor's
    allow_file_repos: bool = False  # repo.url may be file:// (tests, single-machine set-ups)
    max_repo_bytes: int = 1024 * 1024 * 1024  # a fetched repository with its checkout
    repo_timeout_s: float = 300.0  # fetch and check out
    egress_presets: str = ""  # JSON: preset name -> allow entries ("preset:<name>")
    egress_hosts: str = ""  # name=ip,... pinned for the egress proxy (mirrors, tests)
    egress_max_bytes: int = 1024 * 1024 * 1024  # per task, both ways
    egress_max_connections: int = 32  # open at once, per task
    sandbox_ca_file: Path | None = None  # PEM: certificates sandboxes with network also trust
    warm_pool_size: int = 0  # sandboxes made ahead of tasks (`up`: 2)

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.data_dir / "tokens"

    @property
    def secrets_path(self) -> Path:
        return self.secrets_file or self.data_dir / "secrets"

    @property
    def workspaces_dir(self) -> Path:
        """The executor's scratch space: a task's repository while it is fetched."""
        return (self.data_dir / "workspaces").resolve()

    @property
    def results_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'results').resolve()}"

    @property
    def model_socket_dir(self) -> Path:
        return self.socket_dir or (self.data_dir / "model").resolve()

    @property
    def model_proxy_socket(self) -> Path:
        return self.proxy_socket or (self.data_dir / "model-proxy.sock").resolve()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise SystemExit(f"{name} must be at least {low:g}, got {value:g}")


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read ``SANDSTREAM_*`` variables; a malformed number exits with a message naming it."""
    env = os.environ if env is None else env
    settings = _read(env)
    _at_least("SANDSTREAM_SANDBOX_MEMORY_MB", settings.sandbox_memory_mb, 64)
    _at_least("SANDSTREAM_SANDBOX_CPUS", settings.sandbox_cpus, 0.01)
    _at_least("SANDSTREAM_SANDBOX_PIDS", settings.sandbox_pids, 16)
    _at_least("SANDSTREAM_MAX_OUTPUT_BYTES", settings.max_output_bytes, 1024 * 1024)
    _at_least("SANDSTREAM_MAX_MODEL_BODY_BYTES", settings.max_model_body_bytes, 64 * 1024)
    _at_least("SANDSTREAM_MAX_MODEL_CONNECTIONS", settings.max_model_connections, 1)
    _at_least("SANDSTREAM_MAX_REPO_BYTES", settings.max_repo_bytes, 1024 * 1024)
    _at_least("SANDSTREAM_REPO_TIMEOUT_S", settings.repo_timeout_s, 1)
    _at_least("SANDSTREAM_EGRESS_MAX_CONNECTIONS", settings.egress_max_connections, 1)
    _at_least("SANDSTREAM_WARM_POOL_SIZE", settings.warm_pool_size, 0)
    if settings.warm_pool_size > MAX_WARM_POOL:
        # Each one holds the sandbox's memory reservation while it waits.
        raise SystemExit(f"SANDSTREAM_WARM_POOL_SIZE must be at most {MAX_WARM_POOL}")
    for name, parse in (
        ("SANDSTREAM_EGRESS_PRESETS", egress.parse_presets),
        ("SANDSTREAM_EGRESS_HOSTS", egress.parse_pins),
    ):
        try:
            parse(getattr(settings, name.removeprefix("SANDSTREAM_").lower()))
        except ValueError as exc:
            raise SystemExit(f"{name}: {exc}") from None
    if not settings.allowed_models:
        raise SystemExit("SANDSTREAM_ALLOWED_MODELS names no model glob")
    return settings


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw) if raw else None


def _read(env: Mapping[str, str]) -> Settings:
    tokens = env.get("SANDSTREAM_TOKENS_FILE")
    socket_dir = env.get("SANDSTREAM_SOCKET_DIR")
    return Settings(
        nats_url=env.get("SANDSTREAM_NATS_URL") or DEFAULT_NATS_URL,
        nats_nkey=_path(env, "SANDSTREAM_NATS_NKEY"),
        nats_creds=_path(env, "SANDSTREAM_NATS_CREDS"),
        data_dir=Path(env.get("SANDSTREAM_DATA_DIR") or ".sandstream"),
        tokens_file=Path(tokens) if tokens else None,
        storage_url=env.get("SANDSTREAM_STORAGE_URL") or None,
        s3_endpoint_url=env.get("SANDSTREAM_S3_ENDPOINT_URL") or None,
        sandbox_image=env.get("SANDSTREAM_SANDBOX_IMAGE") or DEFAULT_IMAGE,
        model_upstream=env.get("SANDSTREAM_MODEL_UPSTREAM") or DEFAULT_UPSTREAM,
        host=env.get("SANDSTREAM_HOST") or "127.0.0.1",
        port=_int(env, "SANDSTREAM_PORT", 8080),
        stream=env.get("SANDSTREAM_STREAM") or "TASKS",
        subject_prefix=env.get("SANDSTREAM_SUBJECT_PREFIX") or "tasks",
        stream_replicas=_int(env, "SANDSTREAM_STREAM_REPLICAS", 1),
        duplicate_window_s=_float(env, "SANDSTREAM_DUPLICATE_WINDOW_S", 6 * 3600.0),
        consumer_prefix=env.get("SANDSTREAM_CONSUMER_PREFIX") or "",
        max_concurrent=_int(env, "SANDSTREAM_MAX_CONCURRENT", 8),
        max_per_tenant=_int(env, "SANDSTREAM_MAX_PER_TENANT", 4),
        ack_wait_s=_float(env, "SANDSTREAM_ACK_WAIT_S", 10.0),
        max_deliver=_int(env, "SANDSTREAM_MAX_DELIVER", 8),
        store_max_deliver=_int(env, "SANDSTREAM_STORE_MAX_DELIVER", 40),
        socket_dir=Path(socket_dir) if socket_dir else None,
        proxy_socket=_path(env, "SANDSTREAM_PROXY_SOCKET"),
        sandbox_memory_mb=_int(env, "SANDSTREAM_SANDBOX_MEMORY_MB", 1024),
        sandbox_cpus=_float(env, "SANDSTREAM_SANDBOX_CPUS", 1.0),
        sandbox_pids=_int(env, "SANDSTREAM_SANDBOX_PIDS", 256),
        instance=env.get("SANDSTREAM_INSTANCE") or "",
        rate_per_tenant=_float(env, "SANDSTREAM_RATE_PER_TENANT", 50.0),
        max_queued_per_tenant=_int(env, "SANDSTREAM_MAX_QUEUED_PER_TENANT", 1000),
        max_waiting=_int(env, "SANDSTREAM_MAX_WAITING", 4096),
        max_streams_per_tenant=_int(env, "SANDSTREAM_MAX_STREAMS_PER_TENANT", 64),
        max_output_bytes=_int(env, "SANDSTREAM_MAX_OUTPUT_BYTES", 16 * 1024 * 1024),
        max_model_body_bytes=_int(env, "SANDSTREAM_MAX_MODEL_BODY_BYTES", 8 * 1024 * 1024),
        max_model_connections=_int(env, "SANDSTREAM_MAX_MODEL_CONNECTIONS", 16),
        allowed_models=tuple(
            glob.strip()
            for glob in (env.get("SANDSTREAM_ALLOWED_MODELS") or "claude-*").split(",")
            if glob.strip()
        ),
        allow_server_tools=env.get("SANDSTREAM_ALLOW_SERVER_TOOLS", "") == "1",
        model_prices=env.get("SANDSTREAM_MODEL_PRICES") or "",
        secrets_file=_path(env, "SANDSTREAM_SECRETS_FILE"),
        allow_file_repos=env.get("SANDSTREAM_ALLOW_FILE_REPOS", "") == "1",
        max_repo_bytes=_int(env, "SANDSTREAM_MAX_REPO_BYTES", 1024 * 1024 * 1024),
        repo_timeout_s=_float(env, "SANDSTREAM_REPO_TIMEOUT_S", 300.0),
        egress_presets=env.get("SANDSTREAM_EGRESS_PRESETS") or "",
        egress_hosts=env.get("SANDSTREAM_EGRESS_HOSTS") or "",
        egress_max_bytes=_int(env, "SANDSTREAM_EGRESS_MAX_BYTES", 1024 * 1024 * 1024),
        egress_max_connections=_int(env, "SANDSTREAM_EGRESS_MAX_CONNECTIONS", 32),
        sandbox_ca_file=_path(env, "SANDSTREAM_SANDBOX_CA_FILE"),
        warm_pool_size=_int(env, "SANDSTREAM_WARM_POOL_SIZE", 0),
    )
