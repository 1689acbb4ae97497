"""The sandbox engine behind a small protocol, and its Docker implementation.

Nothing outside this module knows which engine runs a sandbox. A sandbox is named after its
task (``sandstream-<task_id>``): the engine refuses a second container of that name, which is
how "one sandbox per task" holds even when two deliveries race.

Failure mapping (every method):

- the engine cannot be reached → :class:`~shared.errors.Unavailable` (retry later);
- the image is missing → :class:`~shared.errors.Permanent` with ``code="image_missing"``;
- a sandbox that does not exist → :class:`SandboxNotFound` (``kill``/``remove``/``inspect``/
  ``usage`` treat an absent sandbox as fine instead);
- anything else the engine refuses → :class:`SandboxError`.

Commands run inside the sandbox as the agent's user (``agent``, uid 1000), or, with
``keeper=True``, as the bookkeeping user (uid 1001): a user the agent cannot trace, signal or
write as, who owns :data:`KEEPER_DIR`. No method takes any other user (never root), on purpose.
The container's own process (``sleep`` under ``docker-init``) runs as the keeper too, so the
executor can stop every process of the agent at once (``kill -KILL -1`` as uid 1000) and the
agent cannot end its own container.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

import aiodocker
import aiohttp
import msgspec
import structlog
from aiodocker.exceptions import DockerError

from shared.errors import Permanent, SandstreamError, Unavailable
from shared.events import Usage

log = structlog.get_logger("sandstream.sandbox")

NAME_PREFIX: Final = "sandstream-"
LABEL_TASK: Final = "sandstream.task_id"
LABEL_TENANT: Final = "sandstream.tenant"
LABEL_DEADLINE: Final = "sandstream.deadline"
LABEL_MANAGED: Final = "sandstream.managed"
LABEL_POOL: Final = "sandstream.pool"
"""On a warm-pool sandbox, made before any task: it has no task, tenant or deadline label. A
task claims it by renaming it to its own name (:func:`sandbox_name`)."""
POOL_PREFIX: Final = "pool-"
MANAGED_FILTER: Final = f"{LABEL_MANAGED}=1"

WORKSPACE: Final = "/workspace"
SOCKET_MOUNT: Final = "/run/sandstream"
"""Where a task's model-socket folder is mounted in its sandbox (read-only)."""
SOCKET_NAME: Final = "model.sock"
MODEL_SOCKET: Final = f"{SOCKET_MOUNT}/{SOCKET_NAME}"
"""The model socket as the agent sees it."""
MODEL_PORT: Final = 4000
"""Where the agent reaches the model (``ANTHROPIC_BASE_URL``): a forwarder in the sandbox, on
127.0.0.1, to :data:`MODEL_SOCKET`."""
EGRESS_SOCKET_NAME: Final = "egress.sock"
EGRESS_SOCKET: Final = f"{SOCKET_MOUNT}/{EGRESS_SOCKET_NAME}"
"""The egress proxy's socket of a task with ``network``, in the same folder."""
SAFE_SEGMENT: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SANDBOX_USER: Final = "agent"  # uid 1000 in the image: the user of every exec but the keeper's
SANDBOX_UID: Final = 1000
KEEPER_UID: Final = 1001
"""The run's bookkeeping user: no name in the image, no capabilities, no rights over uid 1000's
processes; it alone can write :data:`KEEPER_DIR`."""
KEEPER_USER: Final = f"{KEEPER_UID}:{KEEPER_UID}"
KEEPER_DIR: Final = "/run/sandstream-keeper"
"""The keeper's own tmpfs (mode 0700): the agent can neither read it nor fill it."""

GiB: Final = 1 << 30
MiB: Final = 1 << 20
# The longest stdout line kept from an exec: a stream-json line of the CLI carrying a large
# tool result fits; an agent writing without newlines is cut here, not buffered without end.
MAX_LINE_BYTES: Final = 8 * MiB

_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


class SandboxError(SandstreamError):
    """The engine refused an operation for a reason other than being unreachable."""


class SandboxNotFound(SandboxError):
    """No sandbox of that name exists."""


def sandbox_name(task_id: str) -> str:
    return f"{NAME_PREFIX}{task_id}"


def is_unclaimed(info: SandboxInfo) -> bool:
    """A warm-pool sandbox no task has claimed yet (its name is still a pool name)."""
    return info.task_id.startswith(POOL_PREFIX)


def socket_folder(root: Path, task_id: str) -> Path:
    """The task's model-socket folder on the host (``<root>/<task_id>``): the model proxy
    listens at ``socket_folder(...) / SOCKET_NAME``, the lifecycle mounts the folder at
    :data:`SOCKET_MOUNT`. ``task_id`` becomes a path: anything but one safe path segment
    (letters, digits, ``_.-``, not starting with a dot) is refused."""
    if not SAFE_SEGMENT.fullmatch(task_id):
        raise ValueError(f"not a task id: {task_id[:64]!r}")
    return root / task_id


def share_with_sandbox(path: Path) -> None:
    """Let the sandbox's user (uid 1000) and this process, and no other local user, use
    ``path`` (a task's socket folder, or the socket in it).

    As root: owned by uid 1000, mode 0700 (a folder) or 0600. As uid 1000: the same modes.
    As any other user the owner cannot be changed, and only "everyone" covers uid 1000:
    0755 / 0666, with a warning (start the model proxy as root or as uid 1000).
    """
    folder = path.is_dir()
    try:
        os.chown(path, SANDBOX_UID, SANDBOX_UID)
        shared = True
    except PermissionError:
        shared = os.getuid() == SANDBOX_UID
    if shared:
        os.chmod(path, 0o700 if folder else 0o600)
        return
    log.warning("model socket open to all local users: start the model proxy as root or uid 1000")
    os.chmod(path, 0o755 if folder else 0o666)


class SandboxSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a task's sandbox looks like.

    ``workspace`` selects what backs ``/workspace`` (writable by uid 1000 in every case):

    - ``"tmpfs"`` (default): a tmpfs owned by uid 1000, ``workspace_size_bytes`` large, gone
      with the container (its pages count against the container's memory limit);
    - ``"volume"``: an anonymous Docker volume, initialised from the image's ``/workspace``
      (owned by ``agent``) and removed with the container;
    - an absolute host path: bind-mounted read-write (the caller makes it writable by 1000);
    - any other string: a named volume, created on first use and never removed here.
    """

    task_id: str
    tenant: str
    image: str
    deadline: float
    """Epoch seconds after which the task times out (kept as a label for restarts)."""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    memory_bytes: int = GiB
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 256
    tmp_size_bytes: int = 512 * MiB
    workspace: str = "tmpfs"
    workspace_size_bytes: int = GiB
    model_socket_dir: str | None = None
    """Host directory bind-mounted read-only at ``/run/sandstream`` (the model proxy's socket)."""
    pooled: bool = False
    """A warm-pool sandbox (``task_id`` is its pool name): labelled :data:`LABEL_POOL`, with
    no task, tenant or deadline label, as it has none yet."""

    @property
    def name(self) -> str:
        return sandbox_name(self.task_id)


class SandboxInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    id: str
    task_id: str
    tenant: str
    image: str
    deadline: float | None
    state: str
    """The engine's state: ``created``, ``running``, ``exited``, ``dead``, ..."""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    adopted: bool = False
    """``create`` found the container already there (a redelivery, or a racing replica)."""


class ExecResult(msgspec.Struct, frozen=True):
    exit_code: int | None
    """``None`` for a detached command."""
    output: bytes
    """stdout and stderr as they arrived, interleaved."""


class ExecStream(Protocol):
    """A running command: its stdout line by line, then its exit code."""

    stderr: bytes
    """The last 64 KiB the command wrote to stderr (complete once ``lines`` is exhausted)."""

    def lines(self) -> AsyncIterator[bytes]:
        """stdout lines without their newline, until the command exits or the stream ends."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """stdout byte for byte (read either this or :meth:`lines`)."""
        ...

    async def wait(self) -> int | None:
        """Exit code, once the output has been read (``None`` if the engine does not know)."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> ExecStream: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SandboxDriver(Protocol):
    """Create, run commands in, and remove sandboxes. Every method is safe to repeat."""

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Create the task's sandbox, or adopt the existing one of that name (not started)."""
        ...

    async def start(self, name: str) -> None:
        """Start it; starting a running sandbox is fine."""
        ...

    async def rename(self, name: str, new_name: str) -> None:
        """Give the sandbox another name (a claimed warm-pool sandbox takes its task's);
        :class:`SandboxNotFound` when it is gone, :class:`SandboxError` when the new name is
        taken."""
        ...

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        detach: bool = False,
    ) -> ExecResult:
        """Run a short command as the sandbox's user and collect its output.

        Bound it with ``asyncio.timeout`` if needed (the command keeps running in the sandbox).
        """
        ...

    async def exec_stream(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        keeper: bool = False,
    ) -> ExecStream:
        """Start a long command as the sandbox's user (as :data:`KEEPER_UID` with ``keeper``);
        read its stdout as it comes."""
        ...

    async def copy_in(
        self, name: str, path: str, archive: AsyncIterator[bytes], *, gzip: bool = False
    ) -> None:
        """Unpack a tar stream (``gzip``: a tar.gz) into ``path`` as the sandbox's user (what
        lands there is the agent's); :class:`SandboxError` naming the cause when it cannot
        (a full workspace)."""
        ...

    async def kill(self, name: str) -> None:
        """SIGKILL the sandbox; absent or already stopped is fine."""
        ...

    async def remove(self, name: str) -> None:
        """Force-remove the sandbox (and its anonymous volumes); absent is fine."""
        ...

    async def usage(self, name: str) -> Usage:
        """CPU seconds, peak memory and wall time so far (zeros when not measurable)."""
        ...

    async def pids_limit_hits(self, name: str) -> int:
        """How many forks the sandbox's pids limit refused (0 when not measurable)."""
        ...

    async def inspect(self, name: str) -> dict[str, Any] | None:
        """The engine's description of the sandbox, or ``None`` if it does not exist."""
        ...

    async def list(self, label: str | Sequence[str] = MANAGED_FILTER) -> list[SandboxInfo]:
        """Sandboxes (running or not) carrying the label(s): ``key`` or ``key=value``."""
        ...

    async def close(self) -> None: ...


# ---- Docker ---------------------------------------------------------------------------------


def container_config(spec: SandboxSpec) -> dict[str, Any]:
    """The hardened Docker create body for a task's sandbox (pure; tested without Docker)."""
    labels = {**spec.labels, LABEL_MANAGED: "1"}
    if spec.pooled:
        labels[LABEL_POOL] = "1"
    else:
        labels |= {
            LABEL_TASK: spec.task_id,
            LABEL_TENANT: spec.tenant,
            LABEL_DEADLINE: f"{spec.deadline:.3f}",
        }
    tmpfs = {"/tmp": f"rw,exec,nosuid,nodev,size={spec.tmp_size_bytes}"}
    binds: list[str] = []
    config: dict[str, Any] = {
        "Image": spec.image,
        "User": KEEPER_USER,  # the container's process; every exec names its user
        "WorkingDir": WORKSPACE,
        "Labels": labels,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "OpenStdin": False,
        "StopSignal": "SIGKILL",
    }
    # Room for two copies of the workspace as git objects: before the run and after it.
    keeper_size = 2 * spec.workspace_size_bytes + 64 * MiB
    tmpfs[KEEPER_DIR] = (
        f"rw,noexec,nosuid,nodev,size={keeper_size},uid={KEEPER_UID},gid={KEEPER_UID},mode=0700"
    )
    if spec.workspace == "tmpfs":
        tmpfs[WORKSPACE] = (
            f"rw,exec,nosuid,nodev,size={spec.workspace_size_bytes},uid=1000,gid=1000,mode=0755"
        )
    elif spec.workspace == "volume":
        config["Volumes"] = {WORKSPACE: {}}
    else:
        binds.append(f"{spec.workspace}:{WORKSPACE}:rw")
    if spec.model_socket_dir is not None:
        binds.append(f"{spec.model_socket_dir}:{SOCKET_MOUNT}:ro")
    config["HostConfig"] = {
        "NetworkMode": "none",
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": True,
        "Tmpfs": tmpfs,
        "Binds": binds,
        "PidsLimit": spec.pids_limit,
        "Memory": spec.memory_bytes,
        "MemorySwap": spec.memory_bytes,  # no swap: the limit is the limit
        "NanoCpus": spec.nano_cpus,
        "Init": True,
        "Privileged": False,
        "AutoRemove": False,
        "RestartPolicy": {"Name": "no"},
        "LogConfig": {"Type": "none", "Config": {}},
    }
    return config


def _unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the container engine (Docker) cannot be reached: {exc}")


@contextlib.contextmanager
def _engine(what: str) -> Iterator[None]:
    """Map transport failures to :class:`Unavailable`; leave API errors to the caller."""
    try:
        yield
    except DockerError as exc:
        if exc.status == 900:  # aiodocker's "cannot connect"
            raise _unreachable(exc) from exc
        raise
    except (aiohttp.ClientConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise _unreachable(exc) from exc
    except TimeoutError as exc:
        raise Unavailable(f"the container engine did not answer in time ({what})") from exc


def _refused(exc: DockerError, what: str) -> SandboxError:
    if exc.status == 404:
        return SandboxNotFound(f"{what}: {exc.message}")
    return SandboxError(f"{what}: [{exc.status}] {exc.message}")


def _parse_docker_time(raw: str | None) -> datetime | None:
    """Docker times have nanoseconds; Python keeps microseconds. The zero time means unset."""
    if not raw or raw.startswith("0001-"):
        return None
    text = raw.replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _info(data: Mapping[str, Any], *, adopted: bool = False) -> SandboxInfo:
    """A SandboxInfo from either an inspect body or a list entry."""
    config = data.get("Config") or {}
    labels: dict[str, str] = dict(config.get("Labels") or data.get("Labels") or {})
    if "Name" in data:
        name = str(data["Name"]).lstrip("/")
    else:
        names = data.get("Names") or [""]
        name = str(names[0]).lstrip("/")
    state = data.get("State")
    status = str(state.get("Status", "")) if isinstance(state, Mapping) else str(state or "")
    deadline: float | None
    try:
        deadline = float(labels[LABEL_DEADLINE])
    except (KeyError, ValueError):
        deadline = None
    return SandboxInfo(
        name=name,
        id=str(data.get("Id", "")),
        task_id=labels.get(LABEL_TASK, name.removeprefix(NAME_PREFIX)),
        tenant=labels.get(LABEL_TENANT, ""),
        image=str(config.get("Image") or data.get("Image") or ""),
        deadline=deadline,
        state=status,
        labels=labels,
        adopted=adopted,
    )


class LineSplitter:
    """Splits a byte stream into lines in linear time, with a bound on a line's length.

    Each chunk is scanned once (only the new bytes are searched for a newline), so an agent
    that writes megabytes without a newline costs the event loop no more than its bytes. A
    line longer than ``max_line`` is cut: its first ``max_line`` bytes are yielded as a line
    and the rest, up to the next newline, is dropped (``cut`` counts such lines).
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.cut = 0
        self._pending = bytearray()
        self._dropping = False

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if not self._dropping:
                room = self.max_line - len(self._pending)
                self._pending += data[start : start + min(room, end - start)]
                if end - start > room:
                    lines.append(bytes(self._pending))
                    self._pending.clear()
                    self._dropping = True
                    self.cut += 1
            if newline < 0:
                return lines
            if not self._dropping:
                lines.append(bytes(self._pending))
            self._pending.clear()
            self._dropping = False
            start = newline + 1

    def rest(self) -> bytes | None:
        """The unterminated last line, if any (at the end of the stream)."""
        if self._dropping or not self._pending:
            return None
        return bytes(self._pending)


class DockerExecStream:
    """A running ``docker exec``: stdout lines, a stderr tail, then the exit code."""

    _STDERR_TAIL: Final = 64 * 1024

    def __init__(self, docker: aiodocker.Docker, exec_: Any, stream: Any) -> None:
        self._docker = docker
        self._exec = exec_
        self._stream = stream
        self._done = False
        self.stderr = b""

    @property
    def exec_id(self) -> str:
        return str(self._exec.id)

    async def lines(self) -> AsyncIterator[bytes]:
        """stdout, line by line; a line over ``MAX_LINE_BYTES`` is cut (see LineSplitter)."""
        splitter = LineSplitter(MAX_LINE_BYTES)
        try:
            async for chunk in self.chunks():
                for line in splitter.feed(chunk):
                    yield line
            if (last := splitter.rest()) is not None:
                yield last
        finally:
            if splitter.cut:
                log.warning("exec output lines cut", lines=splitter.cut, max_bytes=MAX_LINE_BYTES)

    async def chunks(self) -> AsyncIterator[bytes]:
        """stdout as it comes, byte for byte (no line splitting); stderr goes to its tail."""
        try:
            while True:
                with _engine("exec output"):
                    msg = await self._stream.read_out()
                if msg is None:
                    break
                if msg.stream == 2:
                    self.stderr = (self.stderr + msg.data)[-self._STDERR_TAIL :]
                    continue
                yield msg.data
        finally:
            self._done = True

    async def wait(self) -> int | None:
        if not self._done:
            async for _ in self.lines():
                pass
        # The exit code can lag the end of the output by a moment.
        for _ in range(50):
            with _engine("exec inspect"):
                info = await self._exec.inspect()
            if not info.get("Running"):
                code = info.get("ExitCode")
                return int(code) if code is not None else None
            await asyncio.sleep(0.01)
        return None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def __aenter__(self) -> DockerExecStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class DockerDriver:
    """:class:`SandboxDriver` on one Docker engine (API 1.41), through one aiodocker client.

    Build it with ``await DockerDriver.connect()`` (creates the client and checks the engine
    answers) or ``DockerDriver(docker)`` with a client you own. ``close()`` closes the client
    only if the driver created it.
    """

    def __init__(self, docker: aiodocker.Docker, *, owns_client: bool = False) -> None:
        self.docker = docker
        self._owns_client = owns_client

    @classmethod
    async def connect(cls, url: str | None = None) -> DockerDriver:
        """Create a client (``DOCKER_HOST`` or the local socket) and ping the engine.

        Raises :class:`Unavailable` when no engine answers.
        """
        try:
            docker = aiodocker.Docker(url=url)
        except Exception as exc:  # no socket found, bad DOCKER_HOST: aiodocker raises plainly
            raise _unreachable(exc) from exc
        driver = cls(docker, owns_client=True)
        try:
            with _engine("version"):
                await asyncio.wait_for(docker.version(), timeout=5.0)
        except BaseException:
            await docker.close()
            raise
        return driver

    async def close(self) -> None:
        if self._owns_client:
            await self.docker.close()

    # -- lifecycle of a container ------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        name = spec.name
        config = container_config(spec)
        for _ in range(20):
            try:
                with _engine("create"):
                    await self.docker.containers.create(config, name=name)
            except DockerError as exc:
                if exc.status == 404 and "image" in exc.message.lower():
                    raise Permanent(
                        f"the sandbox image {spec.image!r} is not present on the Docker engine;"
                        " build it with `make image` (or set SANDSTREAM_SANDBOX_IMAGE)",
                        code="image_missing",
                    ) from exc
                if exc.status != 409:
                    raise _refused(exc, f"create {name}") from exc
                # The name is taken: adopt that container (a redelivery or a racing replica).
                data = await self.inspect(name)
                if data is not None:
                    return _info(data, adopted=True)
                # It vanished between the two calls (being removed): try again.
                await asyncio.sleep(0.05)
                continue
            data = await self.inspect(name)
            if data is None:  # removed right after we created it: try again
                continue
            return _info(data)
        raise SandboxError(f"create {name}: the name stays taken by a container being removed")

    async def start(self, name: str) -> None:
        try:
            with _engine("start"):
                await self.docker.containers.container(name).start()
        except DockerError as exc:
            if exc.status == 304:  # already running
                return
            raise _refused(exc, f"start {name}") from exc

    async def rename(self, name: str, new_name: str) -> None:
        try:
            with _engine("rename"):
                await self.docker.containers.container(name).rename(new_name)
        except DockerError as exc:
            raise _refused(exc, f"rename {name} to {new_name}") from exc

    async def kill(self, name: str) -> None:
        try:
            with _engine("kill"):
                await self.docker.containers.container(name).kill(signal="SIGKILL")
        except DockerError as exc:
            if exc.status in (404, 409):  # absent, or not running
                return
            raise _refused(exc, f"kill {name}") from exc

    async def remove(self, name: str) -> None:
        try:
            with _engine("remove"):
                await self.docker.containers.container(name).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status == 404:
                return
            if exc.status == 409 and "in progress" in exc.message:
                return  # someone else is removing it
            raise _refused(exc, f"remove {name}") from exc

    async def inspect(self, name: str) -> dict[str, Any] | None:
        try:
            with _engine("inspect"):
                data = await self.docker.containers.container(name).show()
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise _refused(exc, f"inspect {name}") from exc
        return dict(data)

    async def list(self, label: str | Sequence[str] = MANAGED_FILTER) -> list[SandboxInfo]:
        labels = [label] if isinstance(label, str) else list(label)
        try:
            with _engine("list"):
                found = await self.docker.containers.list(all=True, filters={"label": labels})
        except DockerError as exc:
            raise _refused(exc, "list") from exc
        return [_info(c._container) for c in found]

    # -- commands ------------------------------------------------------------------------------

    async def _exec_create(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        workdir: str | None,
        *,
        keeper: bool = False,
    ) -> Any:
        # The agent unless it is the keeper's turn: always named, never "0".
        user = KEEPER_USER if keeper else SANDBOX_USER
        try:
            with _engine("exec"):
                return await self.docker.containers.container(name).exec(
                    list(argv),
                    stdout=True,
                    stderr=True,
                    environment=env,
                    workdir=workdir,
                    user=user,
                )
        except DockerError as exc:
            raise _refused(exc, f"exec in {name}") from exc

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        detach: bool = False,
    ) -> ExecResult:
        """Run ``argv`` and return its exit code and combined output.

        A missing binary is not an exception: exit code 126/127 and the engine's message in
        ``output``.
        """
        exe = await self._exec_create(name, argv, env, workdir)
        if detach:
            with _engine("exec start"):
                await exe.start(detach=True)
            return ExecResult(None, b"")

        chunks: list[bytes] = []
        async with DockerExecStream(self.docker, exe, exe.start(detach=False)) as stream:
            while True:
                with _engine("exec output"):
                    msg = await stream._stream.read_out()
                if msg is None:
                    break
                chunks.append(msg.data)
            stream._done = True
            code = await stream.wait()
        return ExecResult(code, b"".join(chunks))

    async def exec_stream(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        keeper: bool = False,
    ) -> DockerExecStream:
        exe = await self._exec_create(name, argv, env, workdir, keeper=keeper)
        stream = exe.start(detach=False)
        with _engine("exec start"):
            await stream._init()  # attach now, so the command is running when we return
        return DockerExecStream(self.docker, exe, stream)

    async def copy_in(
        self, name: str, path: str, archive: AsyncIterator[bytes], *, gzip: bool = False
    ) -> None:
        # ``tar -x`` inside the sandbox, fed on stdin (an existing folder keeps its owner and
        # mode: /workspace stays readable to the keeper). Docker's archive upload would write
        # under a tmpfs mount rather than into it, and as root.
        try:
            with _engine("exec"):
                exe = await self.docker.containers.container(name).exec(
                    ["tar", "-xz" if gzip else "-x", "--no-overwrite-dir", "-C", path],
                    stdin=True,
                    stdout=True,
                    stderr=True,
                    user=SANDBOX_USER,
                )
        except DockerError as exc:
            raise _refused(exc, f"exec in {name}") from exc
        stream = exe.start(detach=False)
        async with DockerExecStream(self.docker, exe, stream) as running:
            with _engine("exec start"):
                await stream._init()
            cut = False
            try:
                async for chunk in archive:
                    with _engine("copy in"):
                        await stream.write_in(chunk)
            except (ConnectionError, RuntimeError):
                cut = True  # tar stopped reading (it failed): its message says why
            else:
                # End of stdin, while the output is still read (aiodocker's close() would
                # end both).
                response: Any = stream._resp
                transport = response.connection.transport if response.connection else None
                if transport is not None and transport.can_write_eof():
                    transport.write_eof()
            code = await running.wait()
        if code != 0 or cut:
            detail = running.stderr.decode(errors="replace").strip()[-500:] or f"exit {code}"
            if "Wrote only" in detail or "No space left" in detail:
                detail = f"the sandbox's {path} is full ({detail})"
            raise SandboxError(f"cannot unpack into {path} of {name}: {detail}")

    # -- usage -------------------------------------------------------------------------------

    async def usage(self, name: str) -> Usage:
        """Read the container's cgroup v1 counters while it still exists.

        Host files first (``/sys/fs/cgroup/{cpuacct,memory}/<parent>/<id>/``: no round trip),
        then ``cat`` inside the sandbox. A stopped container has no cgroup any more: CPU and
        memory are then 0 and only the wall time is known.
        """
        data = await self.inspect(name)
        if data is None:
            return Usage()
        image = str((data.get("Config") or {}).get("Image") or "")
        state = data.get("State") or {}
        started = _parse_docker_time(state.get("StartedAt"))
        finished = _parse_docker_time(state.get("FinishedAt"))
        wall_ms = 0
        if started is not None:
            end = datetime.now(UTC) if state.get("Running") or finished is None else finished
            wall_ms = max(0, int((end - started).total_seconds() * 1000))
        cpu_ns: int | None = None
        mem: int | None = None
        if state.get("Running"):
            cpu_ns, mem = self._host_cgroup(data)
            if cpu_ns is None or mem is None:
                cpu_ns, mem = await self._exec_cgroup(name)
        return Usage(
            image=image,
            cpu_seconds=(cpu_ns or 0) / 1e9,
            memory_peak_bytes=mem or 0,
            wall_ms=wall_ms,
        )

    async def pids_limit_hits(self, name: str) -> int:
        """Read from the host's cgroup: during a fork bomb no exec can start in the sandbox."""
        data = await self.inspect(name)
        if data is None:
            return 0
        for rel in self._cgroup_dirs(data):
            try:
                events = (_CGROUP_ROOT / "pids" / rel / "pids.events").read_text().split()
            except OSError:
                continue
            if len(events) == 2 and events[0] == "max" and events[1].isdigit():
                return int(events[1])
        return 0

    @staticmethod
    def _cgroup_dirs(data: Mapping[str, Any]) -> tuple[str, str]:
        cid = str(data.get("Id", ""))
        parent = str((data.get("HostConfig") or {}).get("CgroupParent") or "docker").strip("/")
        return f"{parent}/{cid}", f"system.slice/docker-{cid}.scope"

    @staticmethod
    def _host_cgroup(data: Mapping[str, Any]) -> tuple[int | None, int | None]:
        for rel in DockerDriver._cgroup_dirs(data):
            try:
                cpu = int((_CGROUP_ROOT / "cpuacct" / rel / "cpuacct.usage").read_text())
                mem = int((_CGROUP_ROOT / "memory" / rel / "memory.max_usage_in_bytes").read_text())
            except (OSError, ValueError):
                continue
            return cpu, mem
        return None, None

    async def _exec_cgroup(self, name: str) -> tuple[int | None, int | None]:
        argv = [
            "cat",
            "/sys/fs/cgroup/cpuacct/cpuacct.usage",
            "/sys/fs/cgroup/memory/memory.max_usage_in_bytes",
        ]
        try:
            async with asyncio.timeout(5.0):
                result = await self.exec(name, argv)
        except (SandboxError, TimeoutError):
            return None, None
        parts = result.output.split()
        if result.exit_code != 0 or len(parts) != 2:
            return None, None
        try:
            return int(parts[0]), int(parts[1])
        except ValueError:
            return None, None
