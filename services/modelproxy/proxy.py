"""The model proxy: the sandbox's only way out, and the only holder of the real credential.

It runs in its own process (``services.modelproxy``), apart from the executor: it never has
the Docker socket, the bus or root, and the executor never has the credential.

One Unix socket per task at ``<socket_dir>/<task_id>/model.sock`` (the directory is
bind-mounted into that task's sandbox at ``/run/sandstream``; socat inside makes it
``http://127.0.0.1:<port>``). Each socket has its own small aiohttp runner, so the task a
request belongs to is known from the socket it came in on, and removing a task cuts its
connections.

For every request it:

- forwards only ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` (query string
  kept) to the upstream; other ``/v1/`` paths get ``403``, anything else ``404``, both as
  Anthropic-shaped JSON errors;
- screens the body (:mod:`.policy`): size, read time, fields, model, the task's budget;
  never follows a redirect;
- drops whatever credential the sandbox sent (``x-api-key``, ``authorization``) and adds the
  real one: ``ANTHROPIC_API_KEY`` as ``x-api-key``, else ``CLAUDE_CODE_OAUTH_TOKEN`` as a
  bearer token;
- streams the answer back chunk by chunk (SSE passes through as it arrives);
- counts requests and tokens per task (``message_start``/``message_delta`` usage of SSE
  answers, ``usage`` of JSON ones), kept in memory and in ``usage.json`` next to the socket
  so a restarted executor continues the count.

The credential never appears in a log line, an error message or a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from contextvars import Context
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import msgspec
import structlog
from aiohttp import web
from multidict import CIMultiDict

from services.modelproxy.egress import EgressCounts, EgressProxy
from services.modelproxy.policy import Budget, Prices, ProxyPolicy, Refused, screen
from shared.sandbox import SAFE_SEGMENT, SOCKET_NAME, share_with_sandbox, socket_folder

log = structlog.get_logger("sandstream.model_proxy")

USAGE_FILE: Final = "usage.json"
MESSAGES_PATHS: Final = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
OAUTH_BETA: Final = "oauth-2025-04-20"
BUDGET_FILE: Final = "budget.json"
MAX_JSON_USAGE_BODY: Final = 32 * 1024 * 1024
_SUN_PATH_MAX: Final = 107

_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_REQUEST: Final = _HOP_BY_HOP | {
    "host",
    "content-length",
    "accept-encoding",  # the client session negotiates and decodes compression itself
    "x-api-key",
    "authorization",
    "cookie",
}
_DROP_RESPONSE: Final = _HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie"}

TASK_KEY: Final = web.AppKey("task_id", str)


class Credential:
    """The real model credential. Its value is never part of its ``repr``/``str``."""

    __slots__ = ("_value", "kind")

    def __init__(self, kind: Literal["api_key", "oauth"], value: str) -> None:
        if not value:
            raise ValueError("empty credential")
        self.kind = kind
        self._value = value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credential | None:
        """``ANTHROPIC_API_KEY``, else ``CLAUDE_CODE_OAUTH_TOKEN``, else ``None``."""
        env = os.environ if env is None else env
        if key := (env.get("ANTHROPIC_API_KEY") or "").strip():
            return cls("api_key", key)
        if token := (env.get("CLAUDE_CODE_OAUTH_TOKEN") or "").strip():
            return cls("oauth", token)
        return None

    @property
    def secret(self) -> str:
        """The value itself: only for building headers."""
        return self._value

    def apply(self, headers: CIMultiDict[str]) -> None:
        if self.kind == "api_key":
            headers["x-api-key"] = self._value
            return
        headers["authorization"] = f"Bearer {self._value}"
        betas = [b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()]
        if OAUTH_BETA not in betas:
            headers["anthropic-beta"] = ",".join([*betas, OAUTH_BETA])

    def __repr__(self) -> str:
        return f"Credential({self.kind}, <hidden>)"

    __str__ = __repr__


@dataclass
class TaskUsage:
    """What one task consumed through the proxy."""

    requests: int = 0
    upstream_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    refused: int = 0
    """Calls the policy refused (size, fields, model, budget)."""
    budget_exceeded: str = ""
    """Why the task's budget refused a call (``""``: it never did)."""
    last_activity: float = 0.0
    """When bytes last came from the model for the task (epoch seconds; 0: never): the
    executor's stall watchdog reads it (a long answer streams without output lines)."""

    @property
    def tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )

    def add(self, usage: Mapping[str, int], cost_usd: float) -> None:
        self.input_tokens += usage.get("input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)
        self.cache_creation_input_tokens += usage.get("cache_creation_input_tokens", 0)
        self.cache_read_input_tokens += usage.get("cache_read_input_tokens", 0)
        self.cost_usd += cost_usd

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskUsage:
        known: dict[str, Any] = {}
        for name, value in data.items():
            default = cls.__dataclass_fields__.get(name)
            if default is None:
                continue
            kind = type(getattr(cls(), name))
            if isinstance(value, kind) and not isinstance(value, bool):
                known[name] = value
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                known[name] = float(value)
        return cls(**known)


_USAGE_KEYS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _usage_of(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {
        k: int(v)
        for k in _USAGE_KEYS
        if isinstance(v := raw.get(k), int | float) and not isinstance(v, bool)
    }


class TooLarge(Refused):
    """A body over the size cap (``413``)."""


class SseUsage:
    """Token usage of one streamed Messages answer, fed chunk by chunk.

    ``message_start`` carries the input (and cache) tokens; ``message_delta`` carries the final,
    cumulative output tokens (newer API versions repeat the others there too): later values
    replace earlier ones. Only the tail of an incomplete event is buffered.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.usage: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if b"\n\n" not in self._buffer and b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > 1024 * 1024:  # a giant event we do not care about
                self._buffer = self._buffer[-64:]
            return
        text = self._buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = text.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, raw: bytes) -> None:
        data = b"".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:"))
        if b'"message_start"' not in data and b'"message_delta"' not in data:
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("type") == "message_start" and isinstance(obj.get("message"), dict):
            self.usage.update(_usage_of(obj["message"].get("usage")))
        elif obj.get("type") == "message_delta":
            self.usage.update(_usage_of(obj.get("usage")))


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status)


class _Site:
    """One task's socket, the server listening on it and the runner serving it."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server, path: Path) -> None:
        self.runner = runner
        self.server = server
        self.path = path


class _Closed(asyncio.Protocol):
    """A connection past the task's cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ModelProxy:
    """Per-task Unix-socket listeners in front of the Messages API.

    ``await proxy.start()`` before use, ``await proxy.close()`` at the end (or ``async with``).
    Without a credential the proxy still serves, answering ``401`` to every forwardable call;
    the executor fails such tasks before ever starting the agent.
    """

    def __init__(
        self,
        *,
        socket_dir: Path,
        upstream: str,
        credential: Credential | None,
        policy: ProxyPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        egress: EgressProxy | None = None,
    ) -> None:
        self.socket_dir = Path(socket_dir)
        self.egress = egress or EgressProxy(socket_dir=self.socket_dir)
        """The tasks' egress sockets, next to their model sockets (``modelproxy/egress.py``)."""
        self.upstream = upstream.rstrip("/")
        self.credential = credential
        self.policy = policy or ProxyPolicy()
        self._prices = Prices.parse(self.policy.prices)
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._sites: dict[str, _Site] = {}
        self._usage: dict[str, TaskUsage] = {}
        self._budgets: dict[str, Budget] = {}

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> ModelProxy:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=True, trust_env=False
            )
        return self

    async def close(self) -> None:
        """Stop every listener and the upstream session.

        Socket files and usage files stay: agents may still be running, and the next proxy
        (:meth:`adopt_existing`) takes their sockets over.
        """
        for task_id in list(self._sites):
            await self._stop_site(task_id, unlink=False)
        await self.egress.close()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> ModelProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- tasks --------------------------------------------------------------------------
    def socket_path(self, task_id: str) -> Path:
        return socket_folder(self.socket_dir, task_id) / SOCKET_NAME

    @property
    def tasks(self) -> list[str]:
        return list(self._sites)

    async def add_task(self, task_id: str, budget: Budget | None = None) -> Path:
        """Listen on the task's socket (idempotent); returns its path.

        Creates ``<socket_dir>/<task_id>/`` when missing. A stale socket file (left by a
        previous proxy) is replaced. ``budget`` (kept next to the socket, so a restarted proxy
        keeps enforcing it) replaces the task's earlier one when given. Raises ``ValueError``
        for a task id that is not a safe file name or a path too long for a Unix socket,
        ``OSError`` when binding fails.
        """
        if not SAFE_SEGMENT.fullmatch(task_id):
            raise ValueError(f"task id {task_id!r} is not usable as a socket directory name")
        path = self.socket_path(task_id)
        if budget is not None:
            self._budgets[task_id] = budget
        elif task_id not in self._budgets:
            self._budgets[task_id] = self._load_budget(task_id)
        site = self._sites.get(task_id)
        if site is not None:
            if path.is_socket():
                return path
            await self._stop_site(task_id, unlink=False)  # its file is gone: bind again
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ValueError(f"socket path too long for a Unix socket ({len(str(path))}): {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        share_with_sandbox(path.parent)
        if budget is not None:
            self._save(task_id, BUDGET_FILE, msgspec.json.encode(budget))
        if task_id not in self._usage:
            self._usage[task_id] = self._load_usage(task_id)
            self._save_usage(task_id, self._usage[task_id])  # also marks the dir as ours
        # Served from an empty context: requests must not inherit the log context (message
        # ids, sequence) of whichever handler happened to open the socket.
        self._sites[task_id] = await asyncio.create_task(
            self._serve(task_id, path), context=Context()
        )
        log.debug("model socket listening", task_id=task_id)
        return path

    async def _serve(self, task_id: str, path: Path) -> _Site:
        app = web.Application(client_max_size=self.policy.max_body_bytes)
        app[TASK_KEY] = task_id
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        handlers = runner.server
        assert handlers is not None
        cap = self.policy.max_connections

        def accept() -> asyncio.Protocol:
            # Past the cap the connection is closed at once: one sandbox cannot hold more of
            # this process's sockets and buffers than that.
            if len(handlers.connections) >= cap:
                return _Closed()
            return handlers()

        try:
            server = await asyncio.get_running_loop().create_unix_server(accept, str(path))
            share_with_sandbox(path)
        except BaseException:
            await runner.cleanup()
            raise
        return _Site(runner, server, path)

    async def adopt_existing(self) -> list[str]:
        """Listen again on every task socket left in ``socket_dir`` (after a restart).

        A sandbox whose agent is mid-run keeps calling its socket; re-binding it at start-up,
        before the task's message is redelivered, lets the CLI's retries succeed.
        """
        adopted: list[str] = []
        if not self.socket_dir.is_dir():
            return adopted
        await self.egress.adopt_existing()
        for entry in sorted(self.socket_dir.iterdir()):
            if entry.is_dir() and (
                (entry / SOCKET_NAME).is_socket() or (entry / USAGE_FILE).is_file()
            ):
                try:
                    await self.add_task(entry.name)
                except (ValueError, OSError) as exc:
                    log.warning("cannot adopt model socket", task_id=entry.name, error=str(exc))
                    continue
                adopted.append(entry.name)
        return adopted

    async def add_egress(self, task_id: str, allow: list[str]) -> None:
        """Open the task's egress socket with its ``network.allow`` (``ValueError`` for an
        entry the policy does not take)."""
        await self.egress.add_task(task_id, allow)

    async def egress_counts(self, task_id: str) -> EgressCounts:
        return self.egress.counts(task_id)

    async def remove_task(self, task_id: str) -> None:
        """Stop listening for the task; remove its socket and usage files (absent is fine)."""
        await self.egress.remove_task(task_id)
        await self._stop_site(task_id, unlink=True)
        self._usage.pop(task_id, None)
        self._budgets.pop(task_id, None)
        if SAFE_SEGMENT.fullmatch(task_id):
            for name in (SOCKET_NAME, USAGE_FILE, BUDGET_FILE):
                with contextlib.suppress(OSError):
                    (socket_folder(self.socket_dir, task_id) / name).unlink()

    async def _stop_site(self, task_id: str, *, unlink: bool) -> None:
        site = self._sites.pop(task_id, None)
        if site is None:
            return
        site.server.close()
        await site.runner.cleanup()
        if unlink:
            with contextlib.suppress(OSError):
                site.path.unlink()

    async def credential_kind(self) -> str | None:
        """``"api_key"``, ``"oauth"`` or ``None``: never the value."""
        return None if self.credential is None else self.credential.kind

    async def usage(self, task_id: str) -> TaskUsage:
        """Requests and tokens of the task so far (zeros for an unknown task)."""
        found = self._usage.get(task_id)
        if found is None:
            found = self._load_usage(task_id)
        return TaskUsage(**found.as_dict())

    def _load_usage(self, task_id: str) -> TaskUsage:
        try:
            raw = (socket_folder(self.socket_dir, task_id) / USAGE_FILE).read_bytes()
            data = json.loads(raw)
            return TaskUsage.from_dict(data) if isinstance(data, dict) else TaskUsage()
        except (OSError, ValueError, TypeError):
            return TaskUsage()

    def _load_budget(self, task_id: str) -> Budget:
        try:
            raw = (socket_folder(self.socket_dir, task_id) / BUDGET_FILE).read_bytes()
            return msgspec.json.decode(raw, type=Budget)
        except (OSError, ValueError):  # msgspec.DecodeError is a ValueError
            return Budget()

    def _save_usage(self, task_id: str, usage: TaskUsage) -> None:
        self._save(task_id, USAGE_FILE, json.dumps(usage.as_dict()).encode())

    def _save(self, task_id: str, name: str, data: bytes) -> None:
        try:
            folder = socket_folder(self.socket_dir, task_id)
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(folder / name)
        except (OSError, ValueError) as exc:
            log.debug("not saved", file=name, task_id=task_id, error=str(exc))

    # ---- requests ------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task_id = request.app[TASK_KEY]
        path = request.path
        if path not in MESSAGES_PATHS:
            if path.startswith("/v1/"):
                return _error(
                    403, "permission_error", "the Sandstream model proxy forwards only /v1/messages"
                )
            return _error(404, "not_found_error", f"not found: {path}")
        if request.method != "POST":
            return _error(405, "invalid_request_error", f"{request.method} not allowed on {path}")
        if self.credential is None or self._session is None:
            return _error(
                401,
                "authentication_error",
                "no model credential is configured for Sandstream "
                "(set ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN for the executor)",
            )
        usage = self._usage.setdefault(task_id, TaskUsage())
        usage.requests += 1
        started = time.monotonic()
        try:
            body, model = await self._screen(request, task_id, usage)
        except Refused as exc:
            usage.refused += 1
            self._save_usage(task_id, usage)
            log.info("model request refused", task_id=task_id, path=path, reason=str(exc))
            status = 413 if isinstance(exc, TooLarge) else 400
            kind = "request_too_large" if status == 413 else "invalid_request_error"
            return _error(status, kind, f"Sandstream's model proxy refused the request: {exc}")
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST
        )
        self.credential.apply(headers)
        url = self.upstream + path
        if request.query_string:
            url += "?" + request.query_string
        try:
            upstream = await self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            usage.upstream_errors += 1
            log.warning("model upstream unreachable", task_id=task_id, error=type(exc).__name__)
            resp = _error(502, "api_error", "the model upstream cannot be reached")
            resp.headers["x-should-retry"] = "true"
            return resp
        counted: dict[str, int] = {}
        async with upstream:
            if upstream.status >= 400:
                usage.upstream_errors += 1
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _DROP_RESPONSE:
                    out.headers.add(key, value)
            content_type = upstream.headers.get("content-type", "")
            sse = SseUsage() if "text/event-stream" in content_type else None
            keep_json = (
                sse is None
                and path == "/v1/messages"
                and upstream.status < 300
                and "json" in content_type
            )
            json_body = bytearray()
            try:
                await out.prepare(request)
                async for chunk in upstream.content.iter_any():
                    usage.last_activity = time.time()
                    if sse is not None:
                        sse.feed(chunk)
                    elif keep_json and len(json_body) < MAX_JSON_USAGE_BODY:
                        json_body += chunk
                    await out.write(chunk)
                await out.write_eof()
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                # The upstream or the CLI went away mid-answer: nothing more can be sent.
                log.info("model stream cut", task_id=task_id, error=type(exc).__name__)
            finally:
                if path == "/v1/messages":
                    if sse is not None:
                        counted = sse.usage
                    elif keep_json:
                        with contextlib.suppress(ValueError):
                            parsed = json.loads(json_body)
                            if isinstance(parsed, dict):
                                counted = _usage_of(parsed.get("usage"))
                    usage.add(counted, self._prices.cost(model, counted))
                self._save_usage(task_id, usage)
        log.debug(
            "model request",
            task_id=task_id,
            path=path,
            status=upstream.status,
            ms=round((time.monotonic() - started) * 1000, 1),
            **counted,
        )
        return out

    async def _screen(
        self, request: web.Request, task_id: str, usage: TaskUsage
    ) -> tuple[bytes, str]:
        """The body to forward and its model; raises :class:`Refused`."""
        declared = request.content_length
        if declared is not None and declared > self.policy.max_body_bytes:
            raise TooLarge(f"the body is larger than {self.policy.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(self.policy.body_timeout_s):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"the body is larger than {self.policy.max_body_bytes} bytes") from None
        except TimeoutError:
            raise Refused(
                f"the body was not sent within {self.policy.body_timeout_s:g} s"
            ) from None
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise Refused("the request body is not JSON") from None
        screened, removed = screen(parsed, self.policy)
        if removed:
            # Names the agent chose: a few of them, each cut short, and how many in all.
            log.warning(
                "model request fields removed",
                task_id=task_id,
                removed=removed[:10],
                count=len(removed),
            )
        reason = self._budgets.get(task_id, Budget()).exceeded(usage.tokens, usage.cost_usd)
        if reason:
            usage.budget_exceeded = reason
            raise Refused(f"budget exceeded: {reason}")
        body = raw if not removed else json.dumps(screened).encode()
        return body, str(screened["model"])
