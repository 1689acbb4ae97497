"""The engine side of a task's sandbox: its spec and labels, start, usage, removal, listing.

Names are derived from validated task ids (``sandbox_name``), never taken from an event.
The model socket folder is made here before the sandbox starts (it is bound into it) and
removed with the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Final

import msgspec

from shared import events as ev
from shared import launch
from shared.sandbox import (
    MANAGED_FILTER,
    POOL_PREFIX,
    GiB,
    MiB,
    SandboxDriver,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    is_unclaimed,
    sandbox_name,
    share_with_sandbox,
    socket_folder,
)
from shared.settings import Settings

LABEL_STREAM: Final = "sandstream.stream"
"""Which event stream a sandbox belongs to: a lifecycle only ever reaps its own stream's."""
LABEL_INSTANCE: Final = "sandstream.instance"
"""The installation (``settings.instance``, set by ``sandstream up``) that owns the sandbox."""


class LifecycleOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Sandbox limits and worker sizing; the defaults suit one machine."""

    memory_bytes: int = GiB
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 256
    tmp_size_bytes: int = 512 * MiB
    workspace: str = "tmpfs"
    workspace_size_bytes: int = GiB
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra labels on every sandbox (tests use one to find and clean up their own)."""
    admit_concurrency: int | None = None
    """``TaskRequested`` messages in hand at once, waiting ones included (default: 8 × cap)."""
    control_concurrency: int = 16
    reconcile_on_start: bool = True
    warm_pool: int = 0
    """Sandboxes kept made and started ahead of any task (``SANDSTREAM_WARM_POOL_SIZE``)."""

    @classmethod
    def of(cls, settings: Settings) -> LifecycleOptions:
        """The options the settings ask for (``SANDSTREAM_SANDBOX_*``)."""
        return cls(
            memory_bytes=settings.sandbox_memory_mb * MiB,
            nano_cpus=int(settings.sandbox_cpus * 1e9),
            pids_limit=settings.sandbox_pids,
            warm_pool=settings.warm_pool_size,
        )


class Sandboxes:
    def __init__(
        self, driver: SandboxDriver, settings: Settings, options: LifecycleOptions, stream: str
    ) -> None:
        self.driver = driver
        self.settings = settings
        self.options = options
        self.stream = stream
        self._usage: dict[str, ev.Usage] = {}  # read before removal, kept until forgotten

    def labels(self) -> dict[str, str]:
        labels = {**self.options.labels, LABEL_STREAM: self.stream}
        if self.settings.instance:
            labels[LABEL_INSTANCE] = self.settings.instance
        return labels

    def _spec(self, name: str, tenant: str, deadline: float, *, pooled: bool) -> SandboxSpec:
        """The hardened sandbox of a task (or of the pool: ``name`` is then its pool name),
        its model socket folder made and bound in."""
        socket_dir = socket_folder(self.settings.model_socket_dir, name)
        socket_dir.mkdir(parents=True, exist_ok=True)
        share_with_sandbox(socket_dir)
        o = self.options
        return SandboxSpec(
            task_id=name,
            tenant=tenant,
            image=self.settings.sandbox_image,
            deadline=deadline,
            labels=self.labels(),
            memory_bytes=o.memory_bytes,
            nano_cpus=o.nano_cpus,
            pids_limit=o.pids_limit,
            tmp_size_bytes=o.tmp_size_bytes,
            workspace=o.workspace,
            workspace_size_bytes=o.workspace_size_bytes,
            model_socket_dir=str(socket_dir),
            pooled=pooled,
        )

    async def start(self, requested: ev.TaskRequested, deadline: float) -> SandboxInfo:
        """Create and start the task's sandbox, or adopt the one a previous try made."""
        spec = self._spec(requested.task_id, requested.tenant, deadline, pooled=False)
        info = await self.driver.create(spec)
        if info.state != "running":
            await self.driver.start(info.name)
        return info

    def started_before(self, task: str) -> bool:
        """A previous try went as far as the task's socket folder: it may have a sandbox."""
        return socket_folder(self.settings.model_socket_dir, task).exists()

    async def make_pooled(self) -> str:
        """Create and start a warm-pool sandbox with the agent's launcher waiting in it (the
        claiming task's run starts without an exec: ``shared.launch``); its pool name."""
        name = f"{POOL_PREFIX}{secrets.token_hex(8)}"
        spec = self._spec(name, "", 0.0, pooled=True)
        try:
            await self.driver.create(spec)
            await self.driver.start(sandbox_name(name))
            await launch.start(self.driver, sandbox_name(name))
        except BaseException:
            with contextlib.suppress(Exception):
                await self.remove(name)
            raise
        return name

    async def claim(self, pool: str, requested: ev.TaskRequested) -> SandboxInfo | None:
        """Make the pool sandbox ``pool`` the task's: its socket folder becomes the task's (a
        rename: the sandbox's bind mount follows the folder), then its name does. The folder
        rename is the claim: of two claimers, one finds it gone. ``None`` when it cannot be
        had (taken, or gone from the engine): the caller makes one."""
        task = requested.task_id
        root = self.settings.model_socket_dir
        try:
            os.rename(socket_folder(root, pool), socket_folder(root, task))
        except FileNotFoundError:
            return None
        try:
            await self.driver.rename(sandbox_name(pool), sandbox_name(task))
        except SandboxError:
            await self.driver.remove(sandbox_name(pool))  # the folder stays the task's
            return None
        return SandboxInfo(
            name=sandbox_name(task),
            id="",
            task_id=task,
            tenant=requested.tenant,
            image=self.settings.sandbox_image,
            deadline=None,
            state="running",
        )

    async def usage(self, task: str) -> ev.Usage:
        """What the sandbox used, read once and kept until :meth:`remove`: a retry after a
        failed publish reports the same figures."""
        usage = self._usage.get(task)
        if usage is None:
            usage = await self.driver.usage(sandbox_name(task))
            if not usage.image:
                usage = msgspec.structs.replace(usage, image=self.settings.sandbox_image)
            self._usage[task] = usage
        return usage

    async def exists(self, task: str) -> bool:
        return await self.driver.inspect(sandbox_name(task)) is not None

    async def remove(self, task: str) -> None:
        """Remove the sandbox (absent is fine) and its model socket folder."""
        await self.driver.remove(sandbox_name(task))
        self._usage.pop(task, None)
        with contextlib.suppress(OSError):
            shutil.rmtree(socket_folder(self.settings.model_socket_dir, task))

    async def reap(self, info: SandboxInfo) -> None:
        """Remove a sandbox of ours that belongs to no known task (by its engine name); an
        unclaimed pool sandbox goes with its socket folder."""
        if is_unclaimed(info):
            await self.remove(info.task_id)
        else:
            await self.driver.remove(info.name)

    async def own(self) -> list[SandboxInfo]:
        """This installation's sandboxes (same stream and, when set, same ``instance``):
        another installation sharing the engine has tasks we do not know."""
        filters = [MANAGED_FILTER, f"{LABEL_STREAM}={self.stream}"]
        if self.settings.instance:
            filters.append(f"{LABEL_INSTANCE}={self.settings.instance}")
        return await self.driver.list(filters)
