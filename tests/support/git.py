"""Real git for tests: bare repositories on disk, served over ``file://`` and smart HTTP.

:class:`GitHttpServer` is a small aiohttp server on loopback in front of ``git http-backend``
(the CGI that ships with git), with HTTP Basic authentication when it is given a password, and
pushes allowed (``http.receivepack``). It records the requests it saw (method, path, user,
whether a password came), so a test can check what a client sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.support.serve import serving

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git (no user configuration); its stdout. Raises on failure."""
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout


def make_repo(root: Path, name: str, files: dict[str, str], *, branch: str = "main") -> Path:
    """A bare repository ``root/name.git`` with one commit of ``files`` on ``branch``, tag
    ``v1`` on it, then a second commit (``second.txt``) on ``branch``."""
    work = root / f"{name}-work"
    bare = root / f"{name}.git"
    work.mkdir(parents=True)
    git("init", "-q", "-b", branch, str(work))
    for path, content in files.items():
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("tag", "v1", cwd=work)
    (work / "second.txt").write_text("second\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "second", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare))
    git("config", "http.receivepack", "true", cwd=bare)
    return bare


def rev(repo: Path, ref: str) -> str:
    return git("rev-parse", ref, cwd=repo).strip()


@dataclass
class Seen:
    method: str
    path: str
    user: str | None
    password_sent: bool


@dataclass
class GitHttpServer:
    """``git http-backend`` for every repository under ``root``, at ``url``."""

    root: Path
    user: str | None = None
    password: str | None = None
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _serving: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def __aenter__(self) -> GitHttpServer:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        port = await self._serving.enter_async_context(serving(app))
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._serving.aclose()

    def _user(self, request: web.Request) -> tuple[str | None, str | None]:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None, None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, password

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        user, password = self._user(request)
        self.seen.append(Seen(request.method, request.path, user, password is not None))
        if self.password is not None and (user, password) != (self.user, self.password):
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Basic realm="git"'}, text="no"
            )
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user or "",
            "REMOTE_ADDR": "127.0.0.1",
        }
        if "Content-Encoding" in request.headers:
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        proc = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)
