"""An in-memory :class:`~shared.sandbox.SandboxDriver` for fast tests of the services around it.

It keeps containers in a dict and behaves like the Docker driver where the services depend on
it, which ``tests/integration/test_sandbox_contract.py`` checks against both: a second create
of a name adopts the first (one sandbox per task), a removed sandbox is gone (``inspect`` is
``None``, ``start`` raises :class:`SandboxNotFound`), kill and remove of an absent sandbox are
fine, ``list`` filters by ``key`` or ``key=value`` labels, a missing image is ``Permanent``
with code ``image_missing``. Commands do not run: ``exec`` answers with ``on_exec`` (exit 0 and
no output unless a test sets it), so the executor still needs the real engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from shared.errors import Permanent
from shared.events import Usage
from shared.sandbox import (
    MANAGED_FILTER,
    ExecResult,
    SandboxError,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    container_config,
)

ExecHandler = Callable[[str, Sequence[str]], Awaitable[ExecResult]]


async def _nothing(name: str, argv: Sequence[str]) -> ExecResult:
    return ExecResult(0, b"")


@dataclass
class _Container:
    id: str
    name: str
    config: dict[str, Any]
    status: str = "created"
    started_at: float | None = None
    finished_at: float | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Name": "/" + self.name,
            "State": {
                "Status": self.status,
                "Running": self.status == "running",
                "OOMKilled": False,
            },
            "Config": {
                "Image": self.config["Image"],
                "User": self.config["User"],
                "Labels": dict(self.labels),
            },
            "HostConfig": dict(self.config["HostConfig"]),
        }


class _Stream:
    """An exec's stdout, given whole by ``on_exec``."""

    def __init__(self, result: ExecResult) -> None:
        self._result = result
        self.stderr = b""

    async def lines(self) -> AsyncIterator[bytes]:
        for line in self._result.output.splitlines():
            yield line

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._result.output

    async def wait(self) -> int | None:
        return self._result.exit_code

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class MemoryDriver:
    """See the module docstring. ``missing_images`` are refused as Docker refuses them."""

    def __init__(self, *, missing_images: Sequence[str] = (), on_exec: ExecHandler = _nothing):
        self.containers: dict[str, _Container] = {}
        self.missing_images = set(missing_images)
        self.on_exec = on_exec
        self.copied: dict[str, list[tuple[str, bytes]]] = {}
        """Archives unpacked per sandbox (``copy_in``), in order."""
        self.creates: dict[str, int] = {}
        """Containers made per name (an adopted create does not count), like engine events."""
        self._ids = itertools.count(1)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.image in self.missing_images:
            raise Permanent(
                f"the sandbox image {spec.image!r} is not present", code="image_missing"
            )
        found = self.containers.get(spec.name)
        if found is not None:
            return self._info(found, adopted=True)
        config = container_config(spec)
        container = _Container(
            id=f"mem{next(self._ids):012d}",
            name=spec.name,
            config=config,
            labels=dict(config["Labels"]),
        )
        self.containers[spec.name] = container
        self.creates[spec.name] = self.creates.get(spec.name, 0) + 1
        return self._info(container)

    async def start(self, name: str) -> None:
        container = self._get(name)
        if container.status != "running":
            container.status = "running"
            container.started_at = time.time()

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        detach: bool = False,
    ) -> ExecResult:
        self._running(name)
        result = await self.on_exec(name, argv)
        return ExecResult(None, b"") if detach else result

    async def exec_stream(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        keeper: bool = False,
    ) -> _Stream:
        self._running(name)
        return _Stream(await self.on_exec(name, argv))

    async def copy_in(
        self, name: str, path: str, archive: AsyncIterator[bytes], *, gzip: bool = False
    ) -> None:
        self._running(name)
        data = b"".join([chunk async for chunk in archive])
        self.copied.setdefault(name, []).append((path, data))

    async def rename(self, name: str, new_name: str) -> None:
        container = self._get(name)
        if new_name in self.containers:
            raise SandboxError(f"rename {name} to {new_name}: the name is taken")
        container.name = new_name
        self.containers[new_name] = self.containers.pop(name)

    async def kill(self, name: str) -> None:
        container = self.containers.get(name)
        if container is not None and container.status == "running":
            container.status = "exited"
            container.finished_at = time.time()

    async def remove(self, name: str) -> None:
        self.containers.pop(name, None)

    async def usage(self, name: str) -> Usage:
        container = self.containers.get(name)
        if container is None or container.started_at is None:
            return Usage()
        end = container.finished_at or time.time()
        return Usage(
            image=str(container.config["Image"]),
            wall_ms=max(1, int((end - container.started_at) * 1000)),
        )

    async def pids_limit_hits(self, name: str) -> int:
        return 0

    async def inspect(self, name: str) -> dict[str, Any] | None:
        container = self.containers.get(name)
        return None if container is None else container.inspect()

    async def list(self, label: str | Sequence[str] = MANAGED_FILTER) -> list[SandboxInfo]:
        wanted = [label] if isinstance(label, str) else list(label)
        return [
            self._info(c)
            for c in self.containers.values()
            if all(_has(c.labels, want) for want in wanted)
        ]

    async def close(self) -> None:
        return None

    def _get(self, name: str) -> _Container:
        container = self.containers.get(name)
        if container is None:
            raise SandboxNotFound(f"no sandbox named {name}")
        return container

    def _running(self, name: str) -> None:
        if self._get(name).status != "running":
            raise SandboxError(f"exec in {name}: the sandbox is not running")

    @staticmethod
    def _info(container: _Container, *, adopted: bool = False) -> SandboxInfo:
        from shared.sandbox import _info

        return _info(container.inspect(), adopted=adopted)


def _has(labels: Mapping[str, str], want: str) -> bool:
    key, eq, value = want.partition("=")
    return key in labels and (not eq or labels[key] == value)
