"""The egress proxy: a task's only way to the network, through its own Unix socket.

An HTTP forward proxy per task, next to the model socket (``egress.sock`` in the task's socket
folder, bridged to ``127.0.0.1:3128`` in the sandbox, where ``HTTP_PROXY``/``HTTPS_PROXY``
point). ``CONNECT host:port`` opens a tunnel (TLS passes through, never decrypted); a plain
``GET http://host/…`` is forwarded as one request (``Connection: close``). Every request is
decided on the name the client asked for (``shared.egress``), then the proxy resolves it
itself: a pinned name (``SANDSTREAM_EGRESS_HOSTS``) goes to its address, any other one only to
public addresses, so a name that resolves (or rebinds) to this machine, a private network or a
metadata endpoint is refused. Redirects are the client's to follow, each through the proxy.

Refused: ``403`` with a one-line reason, counted per ``host:port``. Allowed: requests and
bytes counted per host. Bounded per task: concurrent connections, bytes both ways, the
request head's size and time, a tunnel's idle time. The counts are kept in the task's folder
(``egress.json``), so a restarted proxy goes on counting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec
import structlog

from shared import egress
from shared.sandbox import EGRESS_SOCKET_NAME as EGRESS_SOCKET
from shared.sandbox import SAFE_SEGMENT, share_with_sandbox, socket_folder

log = structlog.get_logger("sandstream.egress")

POLICY_FILE: Final = "egress-policy.json"
COUNTS_FILE: Final = "egress.json"
MAX_HEAD: Final = 16 * 1024
HEAD_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 10.0
IDLE_TIMEOUT_S: Final = 300.0
CHUNK: Final = 64 * 1024
MAX_HOSTS: Final = 256
"""Hosts counted per task, allowed and refused each: past it, new ones are not listed."""


class EgressLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_connections: int = 32
    """Open connections per task; past it a new one is answered ``429`` and closed."""
    max_bytes: int = 1024 * 1024 * 1024
    """Bytes per task, both ways, all hosts; past it connections are cut."""


class HostCount(msgspec.Struct, kw_only=True):
    host: str
    requests: int = 0
    bytes: int = 0


class Blocked(msgspec.Struct, kw_only=True):
    host: str
    port: int
    count: int = 0
    reason: str = ""


class EgressCounts(msgspec.Struct, kw_only=True):
    allowed: list[HostCount] = msgspec.field(default_factory=list)
    blocked: list[Blocked] = msgspec.field(default_factory=list)
    bytes: int = 0


class _Task:
    def __init__(self, task_id: str, rules: list[egress.Rule], counts: EgressCounts) -> None:
        self.task_id = task_id
        self.rules = rules
        self.counts = counts
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    def allowed_host(self, host: str) -> HostCount:
        for entry in self.counts.allowed:
            if entry.host == host:
                return entry
        entry = HostCount(host=host)
        if len(self.counts.allowed) < MAX_HOSTS:
            self.counts.allowed.append(entry)
        return entry

    def block(self, host: str, port: int, reason: str) -> None:
        for entry in self.counts.blocked:
            if (entry.host, entry.port) == (host, port):
                entry.count += 1
                return
        if len(self.counts.blocked) < MAX_HOSTS:
            self.counts.blocked.append(Blocked(host=host, port=port, count=1, reason=reason))


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class EgressProxy:
    """Per-task egress sockets under ``socket_dir`` (the model proxy's folder layout)."""

    def __init__(
        self,
        *,
        socket_dir: Path,
        presets: Mapping[str, Sequence[str]] | None = None,
        pins: Mapping[str, egress.Pin] | None = None,
        limits: EgressLimits | None = None,
    ) -> None:
        self.socket_dir = Path(socket_dir)
        self.presets = dict(presets or {})
        self.pins = dict(pins or {})
        self.limits = limits or EgressLimits()
        self._tasks: dict[str, _Task] = {}

    # ---- tasks --------------------------------------------------------------------------
    def socket_path(self, task_id: str) -> Path:
        return socket_folder(self.socket_dir, task_id) / EGRESS_SOCKET

    async def add_task(self, task_id: str, allow: Sequence[str] | None = None) -> Path:
        """Listen on the task's egress socket with ``allow`` (kept next to it, so a restarted
        proxy enforces the same); idempotent. ``ValueError`` for a bad id or entry."""
        if not SAFE_SEGMENT.fullmatch(task_id):
            raise ValueError(f"task id {task_id!r} is not usable as a socket directory name")
        folder = socket_folder(self.socket_dir, task_id)
        if allow is None:
            allow = msgspec.json.decode((folder / POLICY_FILE).read_bytes(), type=list[str])
        rules = egress.rules(allow, self.presets)
        path = self.socket_path(task_id)
        task = self._tasks.get(task_id)
        if task is not None:
            task.rules = rules
            if path.is_socket():
                return path
            await self._stop(task_id, unlink=False)
        folder.mkdir(parents=True, exist_ok=True)
        share_with_sandbox(folder)
        _save(folder / POLICY_FILE, msgspec.json.encode(list(allow)))
        task = _Task(task_id, rules, self._load_counts(task_id))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        task.server = await asyncio.start_unix_server(
            lambda r, w: self._serve(task, r, w), path=str(path)
        )
        share_with_sandbox(path)
        self._tasks[task_id] = task
        log.debug("egress socket listening", task_id=task_id, rules=len(rules))
        return path

    async def adopt_existing(self) -> list[str]:
        """Listen again for every task whose policy is on disk (after a restart)."""
        adopted: list[str] = []
        if not self.socket_dir.is_dir():
            return adopted
        for entry in sorted(self.socket_dir.iterdir()):
            if entry.is_dir() and (entry / POLICY_FILE).is_file():
                try:
                    await self.add_task(entry.name)
                except (ValueError, OSError) as exc:
                    log.warning("cannot adopt egress socket", task_id=entry.name, error=str(exc))
                    continue
                adopted.append(entry.name)
        return adopted

    async def remove_task(self, task_id: str) -> None:
        await self._stop(task_id, unlink=True)
        if SAFE_SEGMENT.fullmatch(task_id):
            for name in (EGRESS_SOCKET, POLICY_FILE, COUNTS_FILE):
                with contextlib.suppress(OSError):
                    (socket_folder(self.socket_dir, task_id) / name).unlink()

    async def close(self) -> None:
        for task_id in list(self._tasks):
            await self._stop(task_id, unlink=False)

    def open_connections(self, task_id: str) -> int:
        task = self._tasks.get(task_id)
        return task.connections if task is not None else 0

    def counts(self, task_id: str) -> EgressCounts:
        task = self._tasks.get(task_id)
        if task is not None:
            return msgspec.convert(msgspec.to_builtins(task.counts), EgressCounts)
        return self._load_counts(task_id) if SAFE_SEGMENT.fullmatch(task_id) else EgressCounts()

    async def _stop(self, task_id: str, *, unlink: bool) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None or task.server is None:
            return
        task.server.close()
        for handler in list(task.handlers):  # open tunnels end with their task's socket
            handler.cancel()
        await asyncio.gather(*task.handlers, return_exceptions=True)
        self._save_counts(task)
        if unlink:
            with contextlib.suppress(OSError):
                self.socket_path(task_id).unlink()

    def _load_counts(self, task_id: str) -> EgressCounts:
        try:
            raw = (socket_folder(self.socket_dir, task_id) / COUNTS_FILE).read_bytes()
            return msgspec.json.decode(raw, type=EgressCounts)
        except (OSError, ValueError):
            return EgressCounts()

    def _save_counts(self, task: _Task) -> None:
        folder = socket_folder(self.socket_dir, task.task_id)
        _save(folder / COUNTS_FILE, msgspec.json.encode(task.counts))

    # ---- one connection ---------------------------------------------------------------------
    async def _serve(
        self, task: _Task, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task.connections += 1  # from the accept: an idle connection holds a place too
        handler = asyncio.current_task()
        if handler is not None:
            task.handlers.add(handler)
        try:
            head = await _read_head(reader)  # read before any answer: no reset for the client
            if task.connections > self.limits.max_connections:
                raise _Refused(429, "too many open connections for this task")
            await self._relay(task, head, reader, writer)
        except _Refused as refused:
            await _answer(writer, refused.status, refused.reason)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # The task's socket is closing: this connection ends here. Returning (rather
            # than re-raising) keeps asyncio's stream callback from logging it as an error.
            pass
        finally:
            task.connections -= 1
            if handler is not None:
                task.handlers.discard(handler)
            with contextlib.suppress(Exception):
                writer.close()

    async def _relay(
        self,
        task: _Task,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        method, host, port, forward = _parse(head)
        if not egress.allowed(task.rules, host, port):
            self._refuse(task, host, port, "not in network.allow")
        address = await self._resolve(task, host, port)
        if task.counts.bytes >= self.limits.max_bytes:
            raise _Refused(403, f"the task used its {self.limits.max_bytes} bytes of egress")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(address, port)
        except (OSError, TimeoutError) as exc:
            raise _Refused(502, f"cannot connect to {host}:{port}: {exc}") from None
        entry = task.allowed_host(host)
        entry.requests += 1
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                up_writer.write(forward)
            await asyncio.gather(
                self._pipe(task, entry, reader, up_writer),
                self._pipe(task, entry, up_reader, writer),
            )
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()
            self._save_counts(task)

    def _refuse(self, task: _Task, host: str, port: int, why: str) -> None:
        task.block(host, port, why)
        self._save_counts(task)
        log.info("egress refused", task_id=task.task_id, host=host, port=port, why=why)
        raise _Refused(403, f"sandstream egress: {host}:{port} is refused ({why})")

    async def _resolve(self, task: _Task, host: str, port: int) -> str:
        """The address to connect to: a pin, or a public address of the name (or the
        allowed IP itself, if public)."""
        name = host.lower().rstrip(".")
        if (pin := self.pins.get(name)) is not None:
            if not pin.covers(port):
                self._refuse(task, host, port, "the pinned name is not pinned for this port")
            return pin.address
        ip = egress.as_ip(name)
        if ip is not None:
            if not egress.public(ip):
                self._refuse(task, host, port, "not a public address")
            return str(ip)
        if not egress.HOST_RE.fullmatch(name):
            raise _Refused(400, f"{host!r} is not a host name")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=1)
        except (OSError, UnicodeError) as exc:
            raise _Refused(502, f"cannot resolve {host}: {exc}") from None
        for info in infos:
            address = egress.as_ip(str(info[4][0]))
            if address is not None and egress.public(address):
                return str(address)
        self._refuse(task, host, port, "it resolves to no public address")
        raise AssertionError  # _refuse raises

    async def _pipe(
        self,
        task: _Task,
        entry: HostCount,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
    ) -> None:
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    data = await source.read(CHUNK)
                if not data:
                    break
                task.counts.bytes += len(data)
                entry.bytes += len(data)
                if task.counts.bytes > self.limits.max_bytes:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if sink.can_write_eof():
                    sink.write_eof()
                else:
                    sink.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, bounded in size and time."""
    try:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Refused(431, "the request head is too large") from None
    if len(head) > MAX_HEAD:
        raise _Refused(431, "the request head is too large")
    return head


def _parse(head: bytes) -> tuple[str, str, int, bytes]:
    """``(method, host, port, head to send on)`` of a proxy request; :class:`_Refused`."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "not an HTTP/1.x proxy request")
    method, target, version = parts
    if method == "CONNECT":
        host, port = _authority(target)
        return method, host, port, b""
    if not target.lower().startswith("http://"):
        raise _Refused(400, "a proxy request names an http:// URL (https goes through CONNECT)")
    rest = target[len("http://") :]
    authority, slash, path = rest.partition("/")
    host, port = _authority(authority, default=80)
    # Host is the URL's authority, whatever the client sent: the request goes to the host
    # that was decided on, never to another virtual host behind the same address.
    dropped = ("proxy-", "connection:", "keep-alive:", "host:")
    headers = [f"Host: {authority}"] + [
        line for line in lines[1:] if line and not line.lower().startswith(dropped)
    ]
    request = [f"{method} /{path if slash else ''} {version}", *headers, "Connection: close"]
    return method, host, port, ("\r\n".join(request) + "\r\n\r\n").encode("latin-1")


def _authority(text: str, default: int | None = None) -> tuple[str, int]:
    if "@" in text:
        raise _Refused(400, "no credentials in a proxy request's host")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        if default is None:
            raise _Refused(400, "CONNECT names host:port")
        return host.lower(), default
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _Refused(400, f"bad port {port_text!r}")
    return host.lower(), int(port_text)


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = (reason + "\n").encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 429: "Too Many Requests", 431: "Request "
              "Header Fields Too Large", 502: "Bad Gateway"}.get(status, "Error")  # fmt: skip
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(Exception):
        writer.write(head.encode() + body)
        await writer.drain()


def _save(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        log.debug("not saved", file=path.name, error=str(exc))
