"""Fetching a task's repository on the executor's side, with real git.

Repositories are bare ones on disk, over ``file://`` and over smart HTTP (``git http-backend``
behind a loopback server that checks Basic authentication). Nothing here needs Docker: the
copy into a sandbox is covered by the executor's tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.executor.workspace import Fetcher, WorkspaceError, patch_expands_to, tar_stream
from shared import events as ev
from shared.secrets import get_secret, set_secret
from tests.support.git import GitHttpServer, git, make_repo, rev
from tests.support.serve import serving

TENANT = "acme"
PASSWORD = "gitpw-" + uuid.uuid4().hex


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    make_repo(root, "app", {"README.md": "hello\n", "src/app.py": "print('hi')\n"})
    return root


@pytest_asyncio.fixture
async def server(repos: Path) -> AsyncIterator[GitHttpServer]:
    async with GitHttpServer(repos, user="x-access-token", password=PASSWORD) as s:
        yield s


def fetcher(tmp_path: Path, **options: object) -> Fetcher:
    settings: dict[str, object] = {
        "root": tmp_path / "workspaces",
        "secrets_path": tmp_path / "secrets",
        "max_bytes": 64 * 1024 * 1024,
        "timeout_s": 60.0,
        "allow_file": True,
    }
    settings.update(options)
    return Fetcher(**settings)  # type: ignore[arg-type]


def repo(url: str, **fields: object) -> ev.RepoSpec:
    return ev.RepoSpec(url=url, **fields)  # type: ignore[arg-type]


async def test_a_branch_a_tag_a_commit_and_the_default_branch(tmp_path: Path, repos: Path) -> None:
    f = fetcher(tmp_path)
    bare = repos / "app.git"
    url = f"file://{bare}"
    task = ev.new_task_id()

    default = await f.fetch(task, TENANT, repo(url))
    assert default.ref == "main" and default.commit == rev(bare, "main")
    assert git("symbolic-ref", "--short", "HEAD", cwd=default.path).strip() == "main"
    assert (default.path / "second.txt").exists() and (default.path / ".git").is_dir()

    tag = await f.fetch(task, TENANT, repo(url, ref="v1"))
    assert tag.commit == rev(bare, "v1") and not (tag.path / "second.txt").exists()

    first = rev(bare, "main~1")
    by_commit = await f.fetch(task, TENANT, repo(url, ref=first))
    assert by_commit.commit == first

    shallow = await f.fetch(task, TENANT, repo(url, ref="main", depth=1))
    assert git("rev-list", "--count", "HEAD", cwd=shallow.path).strip() == "1"
    assert shallow.bytes > 0


async def test_failures_name_their_cause(tmp_path: Path, repos: Path) -> None:
    f = fetcher(tmp_path)
    task = ev.new_task_id()
    url = f"file://{repos / 'app.git'}"
    with pytest.raises(WorkspaceError, match="no branch, tag or commit 'nope'"):
        await f.fetch(task, TENANT, repo(url, ref="nope"))
    with pytest.raises(WorkspaceError, match=r"does not appear to be a git repository|not found"):
        await f.fetch(task, TENANT, repo(f"file://{repos / 'missing.git'}"))
    # A port nobody listens on (bound, then closed): refused, and said so.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(WorkspaceError, match=f"127.0.0.1.*{port}|Failed to connect|refused"):
        await f.fetch(task, TENANT, repo(f"http://127.0.0.1:{port}/app.git"))
    # file:// is a transport git refuses unless it is allowed here.
    with pytest.raises(WorkspaceError, match="transport 'file' not allowed"):
        await fetcher(tmp_path, allow_file=False).fetch(task, TENANT, repo(url))


async def test_a_repository_over_the_size_limit_is_stopped(tmp_path: Path, repos: Path) -> None:
    big = repos / "big-work"
    git("init", "-q", "-b", "main", str(big))
    (big / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    git("add", "-A", cwd=big)
    git("commit", "-q", "-m", "big", cwd=big)
    f = fetcher(tmp_path, max_bytes=2 * 1024 * 1024)
    with pytest.raises(WorkspaceError, match="larger than SANDSTREAM_MAX_REPO_BYTES"):
        await f.fetch(ev.new_task_id(), TENANT, repo(f"file://{big}"))


async def test_a_tenant_secret_authenticates_and_never_shows(
    tmp_path: Path, server: GitHttpServer
) -> None:
    f = fetcher(tmp_path, allow_file=False)
    url = f"{server.url}/app.git"
    task = ev.new_task_id()
    with pytest.raises(WorkspaceError) as refused:
        await f.fetch(task, TENANT, repo(url))
    assert "asks for a credential: name a tenant secret in repo.credential" in str(refused.value)
    with pytest.raises(WorkspaceError, match="no secret named 'gh'"):
        await f.fetch(task, TENANT, repo(url, credential="gh"))

    set_secret(f.secrets_path, "other", "gh", PASSWORD)  # another tenant's secret is not ours
    with pytest.raises(WorkspaceError, match="no secret named 'gh'"):
        await f.fetch(task, TENANT, repo(url, credential="gh"))
    set_secret(f.secrets_path, TENANT, "gh", "wrong-" + PASSWORD)
    with pytest.raises(WorkspaceError, match="refused the credential") as wrong:
        await f.fetch(task, TENANT, repo(url, credential="gh"))
    assert PASSWORD not in str(wrong.value)

    set_secret(f.secrets_path, TENANT, "gh", PASSWORD)
    assert (f.secrets_path.stat().st_mode & 0o777) == 0o600
    stored = get_secret(f.secrets_path, TENANT, "gh")
    assert stored is not None and stored.value == PASSWORD
    checkout = await f.fetch(task, TENANT, repo(url, credential="gh"))
    assert (checkout.path / "README.md").read_text() == "hello\n"
    assert any(s.password_sent and s.user == "x-access-token" for s in server.seen)
    # Nothing of the secret in what stays on disk: the checkout's config, the remote URL.
    config = (checkout.path / ".git" / "config").read_text()
    assert PASSWORD not in config and url in config


async def test_a_redirect_is_not_followed_with_the_secret(tmp_path: Path, repos: Path) -> None:
    """A host that redirects elsewhere does not get to send our credential on to it."""
    from aiohttp import web

    async with GitHttpServer(repos) as elsewhere:

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(elsewhere.url + request.path_qs)

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", redirect)
        async with serving(app) as port:
            f = fetcher(tmp_path, allow_file=False)
            set_secret(f.secrets_path, TENANT, "gh", PASSWORD)
            with pytest.raises(WorkspaceError):
                await f.fetch(
                    ev.new_task_id(),
                    TENANT,
                    repo(f"http://127.0.0.1:{port}/app.git", credential="gh"),
                )
        assert not any(s.password_sent for s in elsewhere.seen)


async def test_the_tar_stream_keeps_the_checkout_as_it_is(tmp_path: Path, repos: Path) -> None:
    f = fetcher(tmp_path)
    checkout = await f.fetch(ev.new_task_id(), TENANT, repo(f"file://{repos / 'app.git'}"))
    (checkout.path / "link").symlink_to("/etc/passwd")  # kept as a link, never followed
    data = b"".join([chunk async for chunk in tar_stream(checkout.path)])
    out = tmp_path / "out"
    out.mkdir()
    proc = await asyncio.create_subprocess_exec(
        "tar", "-x", "-C", str(out), stdin=asyncio.subprocess.PIPE
    )
    await proc.communicate(data)
    assert proc.returncode == 0
    assert (out / "src" / "app.py").read_text() == "print('hi')\n"
    assert (out / "link").is_symlink() and os.readlink(out / "link") == "/etc/passwd"
    assert git("rev-parse", "HEAD", cwd=out).strip() == checkout.commit
    f.discard(checkout.path.name)
    assert not checkout.path.exists()


def test_the_sweep_removes_only_what_is_old(tmp_path: Path) -> None:
    f = fetcher(tmp_path)
    old, new = f.folder(ev.new_task_id()), f.folder(ev.new_task_id())
    for folder in (old, new):
        (folder / "sub").mkdir(parents=True)
    stale = f.root / f"{old.name}.bundle"
    stale.write_bytes(b"x")
    for path in (old, stale):
        os.utime(path, (0, 0))
    assert f.sweep(older_than_s=3600) == 2
    assert not old.exists() and not stale.exists() and new.exists()


async def test_a_secret_goes_to_its_host_over_https_only(tmp_path: Path) -> None:
    f = fetcher(tmp_path, allow_file=False)
    task = ev.new_task_id()
    set_secret(f.secrets_path, TENANT, "gh", PASSWORD, host="github.com")
    with pytest.raises(WorkspaceError, match=re.escape("'gh' is for github.com, not 127.0.0.1")):
        await f.fetch(task, TENANT, repo("http://127.0.0.1:9/app.git", credential="gh"))
    set_secret(f.secrets_path, TENANT, "any", PASSWORD)
    with pytest.raises(WorkspaceError, match="over https only"):
        await f.fetch(task, TENANT, repo("http://example.com/app.git", credential="any"))


async def test_a_small_pack_of_a_huge_tree_is_refused_before_checkout(tmp_path: Path) -> None:
    """A file of zeros packs to almost nothing: the tree's size is checked before any of it
    is written, and git itself may write no file larger than the limit."""
    work = tmp_path / "zeros"
    git("init", "-q", "-b", "main", str(work))
    with open(work / "zeros.bin", "wb") as out:
        out.truncate(64 * 1024 * 1024)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "zeros", cwd=work)
    f = fetcher(tmp_path, max_bytes=8 * 1024 * 1024)
    task = ev.new_task_id()
    with pytest.raises(WorkspaceError, match="67108864 bytes"):
        await f.fetch(task, TENANT, repo(f"file://{work}"))
    assert not (f.folder(task) / "zeros.bin").exists()


def test_a_patch_says_what_its_binary_parts_expand_to(tmp_path: Path) -> None:
    patch = tmp_path / "p.diff"
    patch.write_bytes(
        b"diff --git a/x b/x\nGIT binary patch\nliteral 734003200\nzcmeAS@N?(olHy`uVBq!ia0\n\n"
        b"literal 0\nHcmV?d00001\n\ndiff --git a/y b/y\ndelta 12\nabc\n"
    )
    assert patch_expands_to(patch) == 734003212
