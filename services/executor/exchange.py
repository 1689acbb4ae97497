"""What goes into a task's workspace before the run, and what comes out of it after.

In: the task's repository (fetched on this side by :class:`~services.executor.workspace.Fetcher`)
and its files (the tar the gateway stored), copied in as the agent's user, then
``WorkspacePrepared``. Out, once the run is over and every process of the agent stopped: the
files matching ``output.artifacts`` (``artifacts.tar.gz``) and the branch of ``output.branch``
(``changes.bundle``, pushed with ``output.push``, ``BranchPushed``), both from the keeper's
record, both written to the object store by this side.
"""

from __future__ import annotations

import asyncio
import io
import re
import tarfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

import msgspec
import structlog

from services.executor import agent
from services.executor.workspace import (
    Fetcher,
    WorkspaceError,
    elapsed_ms,
    tar_stream,
    through_links,
)
from shared import events as ev
from shared import inputs
from shared.blobstore import BlobStore, sha256_hex
from shared.bus import Bus
from shared.errors import Retry, Unavailable
from shared.results import (
    ARTIFACTS_FILE,
    BUNDLE_FILE,
    CONTENT_TYPES,
    SESSION_FILE,
    WORKSPACE_FILE,
    task_prefix,
)
from shared.sandbox import WORKSPACE, SandboxDriver, SandboxError, SandboxNotFound, sandbox_name

log = structlog.get_logger("sandstream.executor")

SESSION_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""A CLI session id as ``--resume`` may take it (the earlier run's report, the agent's word)."""


class Exchange:
    def __init__(
        self,
        *,
        bus: Bus,
        driver: SandboxDriver,
        store: BlobStore | None,
        fetcher: Fetcher,
        script: str,
        max_artifacts_bytes: int,
        ca: bytes | None = None,
    ) -> None:
        self.bus = bus
        self.driver = driver
        self.store = store
        self.fetcher = fetcher
        self._script = script
        self.max_artifacts_bytes = max_artifacts_bytes
        self.ca = ca

    def config_files(self, spec: ev.TaskSpec) -> dict[str, bytes]:
        """The run's configuration files (:func:`agent.config_files`, this installation's)."""
        return agent.config_files(spec, ca=self.ca)

    async def prepare(self, event: ev.SandboxStarted, spec: ev.TaskSpec) -> None:
        """Fill the workspace: the repository fetched on this side, then the task's files over
        it; then say so (``WorkspacePrepared``). The agent starts only after that event, so a
        redelivery before it fills a workspace nobody has used yet, and one after it never
        again. The checkout stays on this side until the run ends when a branch is asked for."""
        task_id, name = event.task_id, sandbox_name(event.task_id)
        began = time.perf_counter()
        checkout = None
        keep = spec.output is not None and spec.output.branch is not None
        resume = ""
        try:
            if spec.follow_up is not None:
                resume = await self._follow_up(name, event, spec.follow_up)
            if spec.repo is not None:
                checkout = await self.fetcher.fetch(task_id, event.tenant, spec.repo)
                await self._copy_in(name, tar_stream(checkout.path), spec.repo.url)
            if spec.files is not None:
                archive = await self._input(spec.files)
                if checkout is not None:
                    through_links(checkout.path, inputs.names(archive))
                await self._copy_in(name, _once(archive), "the task's files")
            if config := self.config_files(spec):
                packed = inputs.pack([(path, data, 0o600) for path, data in config.items()])
                await self._copy_in(name, _once(packed), "the run's configuration", to="/tmp")
        finally:
            if not keep:
                self.fetcher.discard(task_id)
        prepared = ev.WorkspacePrepared(
            event_id=ev.event_id(task_id, "WorkspacePrepared"),
            task_id=task_id,
            tenant=event.tenant,
            causation_id=event.event_id,
            url=checkout.url if checkout else "",
            ref=checkout.ref if checkout else "",
            commit=checkout.commit if checkout else "",
            bytes=(checkout.bytes if checkout else 0) + (spec.files.size if spec.files else 0),
            ms=elapsed_ms(began),
            files=spec.files.count if spec.files else 0,
            resume=resume,
        )
        await self.bus.publish(prepared)
        log.info("workspace prepared", commit=prepared.commit, bytes=prepared.bytes, ms=prepared.ms)

    async def _follow_up(self, name: str, event: ev.SandboxStarted, parent: str) -> str:
        """Put the earlier task's final workspace and session files in place; the session
        the CLI goes on with. The earlier task must be the same tenant's and have kept them."""
        history = await self.bus.history(parent, types=ev.WITHOUT_OUTPUT)
        requested = history[0] if history and isinstance(history[0], ev.TaskRequested) else None
        if requested is None or requested.tenant != event.tenant:
            raise WorkspaceError(f"no task {parent} of this tenant to follow up on")
        end = next(
            (
                e
                for e in reversed(history)
                if isinstance(e, ev.ExecutionCompleted | ev.ExecutionFailed)
            ),
            None,
        )
        kept = {o.key.rsplit("/", 1)[-1]: o for o in (end.kept if end else [])}
        workspace = kept.get(WORKSPACE_FILE)
        if end is None or workspace is None:
            raise WorkspaceError(f"task {parent} kept no workspace to follow up on")
        await self._copy_in(name, _once(await self._kept(parent, workspace)), "the earlier "
                            "task's workspace", gzip=True)  # fmt: skip
        if (session := kept.get(SESSION_FILE)) is not None:
            data = await self._kept(parent, session)
            await self._copy_in(name, _once(data), "the earlier session", to="/tmp", gzip=True)
        if session is None:
            return ""
        if not SESSION_ID.fullmatch(end.session_id):
            raise WorkspaceError(f"task {parent} ended with no usable session id to resume")
        return end.session_id

    async def _kept(self, parent: str, stored: ev.StoredObject) -> bytes:
        if self.store is None:
            raise WorkspaceError("the executor has no object store to read the earlier task from")
        if not stored.key.startswith(task_prefix(parent)):
            raise WorkspaceError(f"task {parent}'s kept files are not in its own folder")
        data = await self.store.get(stored.key)
        if data is None or sha256_hex(data) != stored.sha256:
            raise WorkspaceError(f"task {parent}'s kept files are missing or altered")
        return data

    async def _copy_in(
        self,
        name: str,
        archive: AsyncIterator[bytes],
        what: str,
        *,
        to: str = WORKSPACE,
        gzip: bool = False,
    ) -> None:
        try:
            await self.driver.copy_in(name, to, archive, gzip=gzip)
        except SandboxNotFound:
            raise Retry("the sandbox went away while its workspace was filled") from None
        except SandboxError as exc:
            raise WorkspaceError(f"cannot copy {what} into the sandbox: {exc}") from None

    async def _input(self, files: ev.FilesRef) -> bytes:
        """The task's files as the gateway stored them, checked against their sha256."""
        if self.store is None:
            raise WorkspaceError("the executor has no object store to read the task's files from")
        if not files.key.startswith(inputs.INPUTS_PREFIX):
            raise WorkspaceError(f"the task's files are not under {inputs.INPUTS_PREFIX}")
        data = await self.store.get(files.key)
        if data is None or sha256_hex(data) != files.sha256:
            raise WorkspaceError("the task's files are missing from the object store or altered")
        try:
            inputs.names(data)
        except (ValueError, tarfile.TarError) as exc:
            raise WorkspaceError(f"the task's files cannot be read: {exc}") from None
        return data

    async def branch(
        self,
        event: ev.SandboxStarted,
        spec: ev.TaskSpec,
        prepared: ev.WorkspacePrepared | None,
        pushed: ev.BranchPushed | None,
    ) -> tuple[ev.BranchInfo | None, tuple[str, str] | None]:
        """The agent's changes as one commit on ``name``, stored as ``changes.bundle`` and,
        with ``push``, pushed to the origin (once: ``BranchPushed`` says it was). The branch
        and its failure: ``branch_failed`` (it could not be made or stored) or
        ``push_failed`` (made and stored, refused by the origin)."""
        task_id, tenant = event.task_id, event.tenant
        assert spec.repo is not None and spec.output is not None and spec.output.branch
        repo, name, push = spec.repo, spec.output.branch, spec.output.push
        if prepared is None:
            return None, ("branch_failed", "the workspace was never prepared")
        info = ev.BranchInfo(name=name, base=prepared.commit)
        try:
            if self.store is None:
                raise WorkspaceError("the executor has no object store for changes.bundle")
            await self.fetcher.ensure(task_id, tenant, repo, prepared.commit)
            patch = self.fetcher.patch_path(task_id)
            if await self._read_patch(sandbox_name(task_id), patch) == 0:
                return info, None  # no changes: no commit, nothing to push
            commit = await self.fetcher.commit(
                task_id,
                tenant,
                repo,
                patch=patch,
                branch=name,
                base=prepared.commit,
                message=_commit_message(spec.prompt, task_id),
                when=prepared.at.isoformat(),
                files=inputs.unpack(await self._input(spec.files)) if spec.files else (),
            )
            if commit is None:
                return info, None
            bundle = await self.fetcher.bundle(task_id, tenant, repo, name, prepared.commit)
            data = await asyncio.to_thread(bundle.read_bytes)
            stored = await self.store.put(
                task_prefix(task_id) + BUNDLE_FILE, data, CONTENT_TYPES[BUNDLE_FILE]
            )
        except WorkspaceError as exc:
            return info, ("branch_failed", f"the branch {name!r} could not be made: {exc}")
        info = msgspec.structs.replace(info, commit=commit, bundle=stored)
        if not push:
            return info, None
        if pushed is None or pushed.commit != commit:
            try:
                await self.fetcher.push(task_id, tenant, repo, name, commit)
            except WorkspaceError as exc:
                return info, ("push_failed", str(exc))
            await self.bus.publish(
                ev.BranchPushed(
                    event_id=ev.event_id(task_id, "BranchPushed"),
                    task_id=task_id,
                    tenant=tenant,
                    causation_id=event.event_id,
                    url=repo.url,
                    branch=name,
                    commit=commit,
                )
            )
        return msgspec.structs.replace(info, pushed=True), None

    async def artifacts(
        self, event: ev.SandboxStarted, patterns: Sequence[str]
    ) -> tuple[ev.ArtifactsInfo | None, tuple[str, str] | None]:
        """The workspace files matching ``patterns`` as ``artifacts.tar.gz`` (for failed runs
        too: logs and reports explain them); ``artifacts_failed`` past the size cap."""
        task_id = event.task_id
        if self.store is None:
            return None, ("artifacts_failed", "the executor has no object store for artifacts")
        argv = agent.artifacts_argv(self._script, patterns)
        data, code, stderr = await self._keeper_output(task_id, argv)
        if data is None:
            message = f"the artifacts are larger than {self.max_artifacts_bytes} bytes (compressed)"
            return None, ("artifacts_failed", message)
        try:
            names = await asyncio.to_thread(_tar_names, data)
        except (tarfile.TarError, EOFError, OSError) as exc:
            detail = stderr or str(exc)
            return None, ("artifacts_failed", f"the artifacts could not be collected: {detail}")
        if code != 0 and not names:
            detail = stderr or f"exit {code}"
            return None, ("artifacts_failed", f"the artifacts could not be collected: {detail}")
        if not names:
            return ev.ArtifactsInfo(files=[]), None
        stored = await self.store.put(
            task_prefix(task_id) + ARTIFACTS_FILE, data, CONTENT_TYPES[ARTIFACTS_FILE]
        )
        return ev.ArtifactsInfo(files=_bounded(names), object=stored), None

    async def keep(
        self, event: ev.SandboxStarted, packed: bytes | None = None
    ) -> tuple[list[ev.StoredObject], list[str]]:
        """The final workspace and the CLI's session files, stored for a follow-up
        (``workspace.tar.gz``, ``session.tar.gz``); the warning ``workspace_not_kept`` when
        they are over the size cap or cannot be read (a follow-up of the task then fails).
        ``packed``: what the run packed itself as it ended (:func:`agent.split_packs`)."""
        if self.store is None:
            return [], []  # an executor without an object store (tests) keeps nothing
        data: bytes | None
        code: int | None
        if packed is not None:
            data, code, stderr = packed, 0, ""
        else:  # one exec for both, then both uploads at once. The cap is the artifacts' (each
            # pack at most, so both at most twice).
            data, code, stderr = await self._keeper_output(
                event.task_id, agent.pack_argv(self._script), keeper=False, limit=2
            )
        try:
            packs = agent.split_packs(data) if data is not None else None
        except ValueError as exc:
            stderr, packs = str(exc), None
        if packs is None:
            log.warning("workspace not kept", code=code, stderr=stderr)
            return [], ["workspace_not_kept"]
        parts: list[tuple[str, bytes]] = []
        if code == 0:
            parts.append((WORKSPACE_FILE, packs.workspace))
        if packs.session is not None:  # none: the CLI wrote no session, nothing to go on from
            parts.append((SESSION_FILE, packs.session))
        fitting = [(file, part) for file, part in parts if len(part) <= self.max_artifacts_bytes]
        failed = code != 0 or packs.session_status not in (0, 5) or len(fitting) < len(parts)
        if failed:
            log.warning(
                "workspace not kept", code=code, session=packs.session_status, stderr=stderr
            )
        try:
            kept = await asyncio.gather(
                *(
                    self.store.put(task_prefix(event.task_id) + file, part, CONTENT_TYPES[file])
                    for file, part in fitting
                )
            )
        except Unavailable as exc:
            # Keeping is for a later follow-up: the run's end does not wait for a store that is
            # down (storage waits for it, with the result).
            log.warning("workspace not kept", error=str(exc))
            return [], ["workspace_not_kept"]
        log.info("workspace kept", packed_by="run" if packed is not None else "exec")
        return list(kept), ["workspace_not_kept"] if failed else []

    async def _keeper_output(
        self, task_id: str, argv: list[str], *, keeper: bool = True, limit: int = 1
    ) -> tuple[bytes | None, int | None, str]:
        """What a command of the script prints after the run (``None`` past ``limit`` ×
        :attr:`max_artifacts_bytes`), its exit status and the tail of its stderr."""
        chunks: list[bytes] = []
        size = 0
        workdir = agent.KEEPER_DIR if keeper else "/tmp"
        async with await self.driver.exec_stream(
            sandbox_name(task_id), argv, workdir=workdir, keeper=keeper
        ) as proc:
            async for chunk in proc.chunks():
                size += len(chunk)
                if size > limit * self.max_artifacts_bytes:
                    return None, None, ""
                chunks.append(chunk)
            code = await proc.wait()
        return b"".join(chunks), code, proc.stderr.decode(errors="replace").strip()[-300:]

    async def _read_patch(self, name: str, target: Path) -> int:
        """The keeper's full diff of the run into ``target``; its size in bytes. Bounded by
        the repository limit (:class:`WorkspaceError` past it)."""
        size = 0
        limit = self.fetcher.max_bytes
        async with await self.driver.exec_stream(
            name, agent.patch_argv(self._script), workdir=agent.KEEPER_DIR, keeper=True
        ) as proc:
            with await asyncio.to_thread(target.open, "wb") as out:
                async for chunk in proc.chunks():
                    size += len(chunk)
                    if size > limit:
                        raise WorkspaceError(
                            f"the agent's changes are larger than {limit} bytes "
                            "(SANDSTREAM_MAX_REPO_BYTES)"
                        )
                    await asyncio.to_thread(out.write, chunk)
            code = await proc.wait()
        if code != 0:
            detail = proc.stderr.decode(errors="replace").strip()[-300:]
            raise WorkspaceError(f"the agent's changes could not be read: {detail or code}")
        return size


def _bounded(names: list[str], count: int = 1000, size: int = 64 * 1024) -> list[str]:
    """The first names that fit ``count`` and ``size`` bytes: the agent chooses them, and
    they travel in an event."""
    kept, total = [], 0
    for name in names[:count]:
        total += len(name.encode()) + 4
        if total > size:
            break
        kept.append(name)
    return kept


def _tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return [m.name for m in tar.getmembers() if m.isfile()]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _commit_message(prompt: str, task_id: str) -> str:
    """The branch commit's message: the task's first line, then where it came from."""
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "changes")
    if len(first) > 72:
        first = first[:71] + "…"
    return f"{first}\n\nMade by the agent of Sandstream task {task_id}.\n"
