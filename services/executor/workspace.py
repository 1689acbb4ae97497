"""The workspace before the agent starts: a repository fetched on the host, copied in.

The sandbox has no network, so the executor fetches the task's ``repo`` itself, into a
scratch folder of its own (``<data dir>/workspaces/<task>``, 0700), checks out the asked ref,
and streams the tree with its ``.git`` into ``/workspace`` (``tar -x`` run as the agent's
user, so everything there is the agent's). The tenant's credential (``repo.credential``, a
tenant secret) reaches only the ``git`` processes run here, through their environment and
a credential helper that prints it: never an argument (``/proc/*/cmdline`` is world
readable), a URL, the sandbox, an event, a log line or an error message.

``git`` runs with no user or system configuration, no prompts, no redirects (a credential
must not follow a redirect to another host), no hooks, and only the allowed transports
(``file`` only with ``SANDSTREAM_ALLOW_FILE_REPOS=1``). Bounded: the folder's size is
watched while git writes it (``SANDSTREAM_MAX_REPO_BYTES``, work tree and ``.git``
together), and the whole preparation has ``SANDSTREAM_REPO_TIMEOUT_S``.

Every failure is a :class:`WorkspaceError` whose message names the cause; the task then
fails with ``workspace_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import msgspec
import structlog

from shared import events as ev
from shared.secrets import get_secret

log = structlog.get_logger("sandstream.executor")

FULL_COMMIT: Final = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
AUTHOR: Final = ("Sandstream", "agent@sandstream.invalid")
"""Who the branch's commit is by (author and committer): the sandbox's identity."""
CREDENTIAL_USER: Final = "x-access-token"
"""The HTTP user name sent with a tenant's secret (hosts that take tokens ignore it)."""
_HELPER: Final = (
    # Answers only for the repository's own protocol and host (never for a host a redirect
    # or a submodule names), from the environment of this one git process.
    '!f() { test "$1" = get || return 0; p=; h=; '
    'while IFS="=" read -r k v; do case "$k" in protocol) p=$v;; host) h=$v;; esac; done; '
    'test "$p" = "$SANDSTREAM_GIT_PROTOCOL" && test "$h" = "$SANDSTREAM_GIT_HOST" && '
    'printf "username=%s\\npassword=%s\\n" "$SANDSTREAM_GIT_USER" "$SANDSTREAM_GIT_PASSWORD"; }; f'
)
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")
"""Where a credential may go over plain http (a mirror or a test on this machine)."""
MAX_GIT_STDOUT: Final = 64 * 1024 * 1024
_ERROR_TAIL: Final = 600
_CHUNK: Final = 256 * 1024


class WorkspaceError(Exception):
    """The workspace could not be prepared (the message names the cause, never a secret)."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class Checkout(msgspec.Struct, frozen=True, kw_only=True):
    path: Path
    url: str
    ref: str
    commit: str
    bytes: int


class Fetcher:
    def __init__(
        self,
        *,
        root: Path,
        secrets_path: Path,
        max_bytes: int,
        timeout_s: float,
        allow_file: bool,
    ) -> None:
        self.root = root
        self.secrets_path = secrets_path
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_file = allow_file

    def folder(self, task_id: str) -> Path:
        if not ev.is_task_id(task_id):  # the folder's name comes from a validated id only
            raise ValueError(f"not a task id: {task_id!r}")
        return self.root / task_id

    async def fetch(self, task_id: str, tenant: str, repo: ev.RepoSpec) -> Checkout:
        """Fetch ``repo`` and check it out in the task's folder (made afresh)."""
        folder = self.folder(task_id)
        self.discard(task_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.mkdir(mode=0o700)
        env = self._environment(tenant, repo)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(folder, repo, env)
        except TimeoutError:
            raise WorkspaceError(
                f"fetching {repo.url} took longer than {self.timeout_s:g} s "
                "(SANDSTREAM_REPO_TIMEOUT_S)"
            ) from None
        except _TooLarge as exc:
            raise WorkspaceError(
                f"{repo.url} is larger than SANDSTREAM_MAX_REPO_BYTES ({self.max_bytes} bytes): "
                f"{exc.size} bytes (fetched and checked out, or listed) when it was stopped"
            ) from None

    async def _fetch(self, folder: Path, repo: ev.RepoSpec, env: dict[str, str]) -> Checkout:
        await self._git(folder, env, ["init", "-q", "."], "cannot prepare a repository")
        await self._git(folder, env, ["remote", "add", "origin", repo.url], "bad repository URL")
        depth = [f"--depth={repo.depth}"] if repo.depth else []
        ref = repo.ref or await self._remote_head(folder, env, repo.url)
        if FULL_COMMIT.match(ref):
            await self._fetch_ref(folder, env, depth, ref, repo.url, ref)
            target, how = ref, ["--detach", ref]
        elif ref.startswith("refs/"):
            await self._fetch_ref(folder, env, depth, ref, repo.url, ref)
            target, how = "FETCH_HEAD", ["--detach", "FETCH_HEAD"]
        elif await self._try_fetch(
            folder, env, depth, f"+refs/heads/{ref}:refs/remotes/origin/{ref}"
        ):
            target, how = f"origin/{ref}", ["-b", ref, "--track", f"origin/{ref}"]
        else:
            tag = f"+refs/tags/{ref}:refs/tags/{ref}"
            await self._fetch_ref(folder, env, depth, tag, repo.url, ref)
            target, how = f"refs/tags/{ref}", ["--detach", f"refs/tags/{ref}"]
        # The work tree's size before it is written: a small pack can hold huge files.
        listing = await self._git(folder, env, ["ls-tree", "-r", "-l", target], "cannot list")
        tree_size = sum(
            int(fields[3]) for line in listing.splitlines()
            if len(fields := line.split(None, 4)) == 5 and fields[3].isdigit()
        )  # fmt: skip
        if tree_size > self.max_bytes:
            raise _TooLarge(tree_size)
        await self._git(folder, env, ["checkout", "-q", *how], "cannot check out")
        commit = (await self._git(folder, env, ["rev-parse", "HEAD"], "no commit")).strip()
        size = await asyncio.to_thread(tree_bytes, folder)
        if size > self.max_bytes:
            raise _TooLarge(size)
        return Checkout(path=folder, url=repo.url, ref=ref, commit=commit, bytes=size)

    async def ensure(self, task_id: str, tenant: str, repo: ev.RepoSpec, commit: str) -> Path:
        """The task's checkout at ``commit``: the one fetched before the run if it is still
        here (the executor may have restarted since), else fetched again at that commit."""
        folder = self.folder(task_id)
        env = self._environment(tenant, repo)
        if (folder / ".git").is_dir():
            with contextlib.suppress(WorkspaceError):
                head = await self._git(folder, env, ["rev-parse", "HEAD"], "")
                if head.strip() == commit:
                    return folder
        again = msgspec.structs.replace(repo, ref=commit, depth=1)
        return (await self.fetch(task_id, tenant, again)).path

    async def commit(
        self,
        task_id: str,
        tenant: str,
        repo: ev.RepoSpec,
        *,
        patch: Path,
        branch: str,
        base: str,
        message: str,
        when: str,
        files: Sequence[tuple[str, bytes, int]] = (),
    ) -> str | None:
        """One commit on top of ``base`` as ``refs/heads/<branch>``: the task's ``files``
        placed as they were, then ``patch``; ``None`` when that changes nothing.

        Deterministic: the same files, patch, message and ``when`` (an ISO time) make the same
        commit id, so a redelivery repeats it exactly. All of it goes to git's index only:
        nothing the agent made is written to this side's disk."""
        folder = self.folder(task_id)
        env = self._environment(tenant, repo)
        await self._git(folder, env, ["read-tree", base], "cannot read the checked-out commit")
        if files:  # the workspace the agent started from: the checkout with the task's files
            entries = []
            for path, content, mode in files:
                blob = await self._git(
                    folder,
                    env,
                    ["hash-object", "-w", "--stdin"],
                    "cannot record a file",
                    stdin=content,
                )
                entries.append(f"{100755 if mode & 0o111 else 100644} {blob.strip()}\t{path}\n")
            await self._git(
                folder,
                env,
                ["update-index", "--add", "--index-info"],
                "cannot place the task's files",
                stdin="".join(entries).encode(),
            )
        expands = await asyncio.to_thread(patch_expands_to, patch)
        if expands > self.max_bytes:
            raise WorkspaceError(
                f"the agent's changes hold {expands} bytes of binary files, more than "
                f"SANDSTREAM_MAX_REPO_BYTES ({self.max_bytes})"
            )
        await self._git(
            folder,
            env,
            ["apply", "--cached", "--binary", "--whitespace=nowarn", str(patch)],
            "the agent's changes do not apply to the checked-out commit",
        )
        tree = (await self._git(folder, env, ["write-tree"], "cannot record the changes")).strip()
        if tree == (await self._git(folder, env, ["rev-parse", f"{base}^{{tree}}"], "")).strip():
            return None
        name, email = AUTHOR
        who = {
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_AUTHOR_DATE": when,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
            "GIT_COMMITTER_DATE": when,
        }
        made = await self._git(
            folder,
            {**env, **who},
            ["commit-tree", tree, "-p", base, "-m", message],
            "cannot make the commit",
        )
        commit = made.strip()
        await self._git(
            folder, env, ["update-ref", f"refs/heads/{branch}", commit], "cannot name the branch"
        )
        return commit

    async def bundle(
        self, task_id: str, tenant: str, repo: ev.RepoSpec, branch: str, base: str
    ) -> Path:
        """``changes.bundle``: the branch, with ``base`` as its prerequisite (a clone of the
        repository at ``base`` or later can fetch from it)."""
        folder = self.folder(task_id)
        target = self.root / f"{task_id}.bundle"
        await self._git(
            folder,
            self._environment(tenant, repo),
            ["bundle", "create", "-q", str(target), f"refs/heads/{branch}", f"^{base}"],
            "cannot bundle the branch",
        )
        return target

    async def push(
        self, task_id: str, tenant: str, repo: ev.RepoSpec, branch: str, commit: str
    ) -> None:
        """Push ``commit`` as the origin's ``branch``, never forced: a branch that moved on
        there is a refusal (a :class:`WorkspaceError` with git's words)."""
        await self._git(
            self.folder(task_id),
            self._environment(tenant, repo),
            ["push", "-q", "origin", f"{commit}:refs/heads/{branch}"],
            f"{repo.url} refused the branch {branch!r}",
        )

    def discard(self, task_id: str) -> None:
        shutil.rmtree(self.folder(task_id), ignore_errors=True)
        for leftover in (self.root / f"{task_id}.bundle", self.root / f"{task_id}.patch"):
            leftover.unlink(missing_ok=True)

    def sweep(self, older_than_s: float) -> int:
        """Remove what tasks left here longer ago than ``older_than_s`` (an executor that
        died mid-task leaves its checkout; a task lives at most an hour). How many."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self.root.iterdir():
            if entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def patch_path(self, task_id: str) -> Path:
        self.folder(task_id)  # validates the id
        return self.root / f"{task_id}.patch"

    async def _remote_head(self, folder: Path, env: dict[str, str], url: str) -> str:
        """The branch the remote's HEAD points at (what a plain clone checks out)."""
        out = await self._git(
            folder, env, ["ls-remote", "--symref", "origin", "HEAD"], f"cannot read {url}"
        )
        for line in out.splitlines():
            if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
                return line.removeprefix("ref: refs/heads/").removesuffix("\tHEAD")
        raise WorkspaceError(f"{url} has no default branch (its HEAD names none); give repo.ref")

    async def _try_fetch(
        self, folder: Path, env: dict[str, str], depth: Sequence[str], refspec: str
    ) -> bool:
        try:
            await self._git(
                folder, env, ["fetch", "-q", "--no-tags", *depth, "origin", refspec], ""
            )
        except WorkspaceError as exc:
            if "couldn't find remote ref" in str(exc) or "not our ref" in str(exc):
                return False
            raise
        return True

    async def _fetch_ref(
        self,
        folder: Path,
        env: dict[str, str],
        depth: Sequence[str],
        refspec: str,
        url: str,
        ref: str,
    ) -> None:
        if not await self._try_fetch(folder, env, depth, refspec):
            raise WorkspaceError(f"{url} has no branch, tag or commit {ref!r}")

    def _environment(self, tenant: str, repo: ev.RepoSpec) -> dict[str, str]:
        protocols = "http:https:git:ssh" + (":file" if self.allow_file else "")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            # No keys, agent or configuration of this host's user: a tenant's ssh:// URL
            # must not log in with what the executor's machine holds.
            "GIT_SSH_COMMAND": (
                "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes "
                "-o IdentityFile=none -o IdentityAgent=none"
            ),
            "GIT_ALLOW_PROTOCOL": protocols,
        }
        if repo.credential is not None:
            entry = get_secret(self.secrets_path, tenant, repo.credential)
            if entry is None:
                raise WorkspaceError(
                    f"tenant {tenant!r} has no secret named {repo.credential!r} "
                    "(sandstream secret set)"
                )
            url = urlsplit(repo.url)
            host = url.netloc.rpartition("@")[2]
            if entry.host and url.hostname != entry.host:
                raise WorkspaceError(
                    f"secret {repo.credential!r} is for {entry.host}, not {url.hostname}"
                )
            if url.scheme != "https" and url.hostname not in LOOPBACK_HOSTS:
                raise WorkspaceError("a credential is sent over https only (repo.url)")
            env["SANDSTREAM_GIT_PROTOCOL"] = url.scheme
            env["SANDSTREAM_GIT_HOST"] = host
            env["SANDSTREAM_GIT_USER"] = CREDENTIAL_USER
            env["SANDSTREAM_GIT_PASSWORD"] = entry.value
        return env

    async def _git(
        self,
        folder: Path,
        env: dict[str, str],
        args: Sequence[str],
        what: str,
        *,
        stdin: bytes | None = None,
    ) -> str:
        """Run one git command in ``folder``, watching the folder's size; its stdout."""
        helper = _HELPER if "SANDSTREAM_GIT_PASSWORD" in env else ""
        config = [
            "-c", f"credential.helper={helper}",
            "-c", "http.followRedirects=false",
            "-c", "core.hooksPath=/dev/null",
            "-c", "core.fsmonitor=false",
            "-c", "core.symlinks=true",
            "-c", "advice.detachedHead=false",
            "-c", f"protocol.file.allow={'always' if self.allow_file else 'never'}",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            # Bounded by the kernel too: no file larger than the repository may be, and a
            # bounded address space (a small patch or pack can expand to gigabytes).
            "prlimit",
            f"--fsize={self.max_bytes}",
            f"--as={max(2 << 30, 3 * self.max_bytes)}",
            "--",
            "git",
            *config,
            *args,
            cwd=folder,
            env=env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        watch = asyncio.create_task(self._watch(folder, proc))
        try:
            out, err = await _bounded_output(proc, stdin)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        size = watch.result() if watch.done() and not watch.cancelled() else None
        if size is not None:
            raise _TooLarge(size)
        if proc.returncode != 0 and (b"signal 25" in err or proc.returncode == -25):
            raise _TooLarge(await asyncio.to_thread(tree_bytes, folder))  # SIGXFSZ: the fsize cap
        if proc.returncode != 0:
            detail = _explain(err.decode(errors="replace"), "SANDSTREAM_GIT_PASSWORD" in env)
            raise WorkspaceError(f"{what}: {detail}" if what else detail)
        return out.decode(errors="replace")

    async def _watch(self, folder: Path, proc: asyncio.subprocess.Process) -> int | None:
        """Kill ``proc`` once ``folder`` outgrows the limit; the size then, else ``None``."""
        while proc.returncode is None:
            size = await asyncio.to_thread(tree_bytes, folder)
            if size > self.max_bytes:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return size
            await asyncio.sleep(0.2)
        return None


_AUTH_REFUSED: Final = (
    "Authentication failed",
    "could not read Username",
    "could not read Password",
)


def _explain(stderr: str, with_credential: bool) -> str:
    """git's own words, led by the cause when it is a known one."""
    detail = stderr.strip()[-_ERROR_TAIL:] or "git failed without a message"
    if any(marker in stderr for marker in _AUTH_REFUSED):
        cause = (
            "the repository refused the credential (repo.credential)"
            if with_credential
            else "the repository asks for a credential: name a tenant secret in repo.credential"
        )
        return f"{cause}; git said: {detail}"
    return detail


async def _bounded_output(
    proc: asyncio.subprocess.Process, stdin: bytes | None
) -> tuple[bytes, bytes]:
    """stdout (at most :data:`MAX_GIT_STDOUT`, else :class:`WorkspaceError`) and the tail of
    stderr of a git process: a hostile server's chatter or refs cannot fill this memory."""
    assert proc.stdout is not None and proc.stderr is not None

    async def feed() -> None:
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            proc.stdin.close()

    async def tail(stream: asyncio.StreamReader) -> bytes:
        kept = b""
        while chunk := await stream.read(65536):
            kept = (kept + chunk)[-_ERROR_TAIL * 4 :]
        return kept

    async def head(stream: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while chunk := await stream.read(65536):
            out += chunk
            if len(out) > MAX_GIT_STDOUT:
                proc.kill()
                raise WorkspaceError(f"git printed more than {MAX_GIT_STDOUT} bytes")
        return bytes(out)

    _, out, err = await asyncio.gather(feed(), head(proc.stdout), tail(proc.stderr))
    await proc.wait()
    return out, err


def patch_expands_to(patch: Path) -> int:
    """What the binary parts of a git patch expand to (``literal N``/``delta N`` lines):
    checked before ``git apply`` holds them all in memory."""
    total = 0
    with patch.open("rb") as lines:
        for line in lines:
            if line.startswith((b"literal ", b"delta ")):
                size = line.split()[1]
                total += int(size) if size.isdigit() else 0
    return total


def through_links(checkout: Path, paths: Sequence[str]) -> None:
    """Refuse a task file whose path goes through a link of the checkout (it would land
    outside the workspace, or somewhere the link chooses); names the first one."""
    for index, path in enumerate(paths):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if (checkout / prefix).is_symlink():
                raise WorkspaceError(
                    f"files[{index}].path {path!r} goes through {prefix!r}, a link in the "
                    "repository"
                )


def tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (links are not followed)."""
    total = 0
    stack = [str(folder)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


async def tar_stream(folder: Path) -> AsyncIterator[bytes]:
    """``folder``'s content as a tar stream (links kept as links, nothing dereferenced)."""
    proc = await asyncio.create_subprocess_exec(
        "tar", "-c", "-C", str(folder), "--numeric-owner", "--owner=0", "--group=0", ".",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while chunk := await proc.stdout.read(_CHUNK):
            yield chunk
        err = await proc.stderr.read()
        if await proc.wait() != 0:
            raise WorkspaceError(f"cannot read the checkout: {err.decode(errors='replace')[-300:]}")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def elapsed_ms(began: float) -> int:
    return int((time.perf_counter() - began) * 1000)
