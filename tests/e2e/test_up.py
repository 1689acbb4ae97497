"""The whole system through `sandstream up`, everything real but the model (a scripted fake)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.up import UP_WARM_POOL
from shared import events as ev
from shared import launch
from shared.bus import Bus, NatsAuth, connect
from shared.errors import Unavailable
from shared.identities import seed_path
from shared.sandbox import sandbox_name
from tests.fakes.model import FakeModel, Text, ToolUse
from tests.support.git import GitHttpServer, git, make_repo, rev
from tests.support.procs import free_port
from tests.support.s3 import MotoS3, fake_aws_env
from tests.support.sandboxes import sandbox_image, wait_for_event

pytestmark = [pytest.mark.docker, pytest.mark.slow]
SECRET = "sk-test-e2e-secret-0123456789"


def docker_available() -> bool:
    probe = subprocess.run(
        ["docker", "image", "inspect", sandbox_image()],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


def sandbox_names(task_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"name=sandstream-{task_id}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.split()


@dataclass
class System:
    url: str
    token: str
    nats_url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def reader(self) -> NatsAuth:
        """The read-only bus identity `up` generated."""
        return NatsAuth(nkey=seed_path(self.data_dir / "nats", "reader"))


async def start_up(tmp: Path, fake: FakeModel, extra_env: dict[str, str] | None = None) -> System:
    port, nats_port = free_port(), free_port()
    data_dir = tmp / "data"
    log = tmp / "up.log"
    env = dict(
        os.environ,
        # By name, so the model proxy resolves a host after it has given up root (its
        # interpreter's files may then be unreadable: everything it needs must be loaded).
        SANDSTREAM_MODEL_UPSTREAM=fake.url.replace("127.0.0.1", "localhost"),
        ANTHROPIC_API_KEY=SECRET,
        SANDSTREAM_ACK_WAIT_S="5",
        **(extra_env or {}),
    )
    env.pop("SANDSTREAM_NATS_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                "--nats-port",
                str(nats_port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    system = System(
        f"http://127.0.0.1:{port}", "", f"nats://127.0.0.1:{nats_port}", data_dir, proc, log
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                async with http.get(f"{system.url}/readyz") as r:
                    if r.status == 200 and (data_dir / "dev-token").exists():
                        break
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, (
                "`sandstream up` did not become ready:\n" + log.read_text()
            )
            await asyncio.sleep(0.1)
    system.token = (data_dir / "dev-token").read_text().strip()
    return system


def stop_up(system: System) -> None:
    if system.proc.poll() is None:
        system.proc.send_signal(signal.SIGINT)
        system.proc.wait(60)


@pytest.fixture
async def fake() -> AsyncIterator[FakeModel]:
    async with FakeModel() as model:
        yield model


@pytest.fixture
async def system(tmp_path: Path, fake: FakeModel) -> AsyncIterator[System]:
    if not docker_available():
        pytest.skip("needs a running Docker engine and the sandbox image (make image)")
    up = await start_up(tmp_path, fake)
    yield up
    stop_up(up)


async def read_sse(
    http: aiohttp.ClientSession, system: System, task_id: str, last_id: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    headers = system.headers()
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    out = []
    async with http.get(f"{system.url}/v1/tasks/{task_id}/events", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
    return out


async def launchers_waiting(system: System, count: int) -> None:
    """Until ``count`` warm-pool sandboxes of ``up`` have their launcher waiting (its bell made;
    pool sandboxes are found by their socket folders)."""
    async with asyncio.timeout(60):
        while True:
            waiting = 0
            for folder in (system.data_dir / "model").glob("pool-*"):
                probe = ["docker", "exec", sandbox_name(folder.name), "test", "-p", launch.BELL]
                waiting += subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
            if waiting >= count:
                return
            await asyncio.sleep(0.05)


async def test_a_task_end_to_end(system: System, fake: FakeModel, tmp_path: Path) -> None:
    prompt = "create hello.txt for the e2e test"
    await launchers_waiting(system, UP_WARM_POOL)
    fake.script(
        [ToolUse.write("hello.txt", "hi from the sandbox\n"), Text("I wrote hello.txt")],
        match=prompt,
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.url}/v1/tasks",
            json={"prompt": prompt, "timeout_s": 120},
            headers=system.headers(),
        ) as r:
            assert r.status == 202
            task_id = (await r.json())["task_id"]

        events = await read_sse(http, system, task_id)  # ends after the terminal event
        types = [name for _, name, _ in events]
        assert types[0] == "TaskRequested" and types[-1] == "TaskSucceeded", types
        for expected in (
            "SandboxStarted",
            "ExecutionStarted",
            "AgentOutput",
            "ExecutionCompleted",
            "SandboxStopped",
            "ResultStored",
        ):
            assert expected in types
        seqs = [seq for seq, _, _ in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # resuming after the third event delivers exactly the rest
        rest = await read_sse(http, system, task_id, last_id=seqs[2])
        assert [seq for seq, _, _ in rest] == seqs[3:]

        async with http.get(f"{system.url}/v1/tasks/{task_id}", headers=system.headers()) as r:
            view = await r.json()
        assert view["status"] == "succeeded"
        async with http.get(
            f"{system.url}/v1/tasks/{task_id}/result", headers=system.headers()
        ) as r:
            assert r.status == 200
            result = await r.json()
    assert result["status"] == "succeeded"
    assert result["text"] == "I wrote hello.txt"
    assert result["total_cost_usd"] > 0
    assert "hello.txt" in result["diff"] and result["files_changed"] == ["hello.txt"]
    assert result["sandbox"]["wall_ms"] > 0
    stored = system.data_dir / "results" / "tasks" / task_id
    assert sorted(p.name for p in stored.iterdir()) == [
        "diff.patch",
        "result.json",
        "session.tar.gz",  # with the workspace: what a follow-up goes on from
        "transcript.jsonl",
        "workspace.tar.gz",
    ]
    assert fake.conversations_matching(prompt) == 1
    assert all(r.api_key == SECRET for r in fake.main_requests())

    # replay reads the same events straight from the stream
    replay = subprocess.run(
        [sys.executable, "-m", "services.cli", "replay", task_id, "--json"],
        # the read-only identity `up` made (replay finds it in the data dir by itself)
        env=dict(
            os.environ,
            SANDSTREAM_NATS_URL=system.nats_url,
            SANDSTREAM_DATA_DIR=str(system.data_dir),
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    replayed = [json.loads(line) for line in replay.stdout.splitlines()]
    assert [(e["seq"], e["type"]) for e in replayed] == [(s, n) for s, n, _ in events]
    # the secret is in no event
    assert SECRET not in replay.stdout

    # Ctrl-C leaves nothing behind: no process it started, no container
    stop_up(system)
    assert system.proc.returncode == 0, system.log.read_text()[-3000:]
    started = re.findall(r'"pid": ?(\d+)|pid=(\d+)', system.log.read_text())
    pids = [int(json_pid or console_pid) for json_pid, console_pid in started]
    assert len(pids) >= 5  # nats-server and the four services
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert alive == []
    assert sandbox_names(task_id) == []
    assert SECRET not in system.log.read_text()
    # It claimed a sandbox of `up`'s warm pool, and the launcher waiting in it started its
    # run (the keeper handed it the start command): no start exec.
    logged = [json.loads(line) for line in system.log.read_text().splitlines() if line[:1] == "{"]
    ours = [line for line in logged if line.get("task_id") == task_id]
    # The gateway's one line for the submission says who asked for what, and how it went.
    accepted = [r for r in ours if r.get("event") == "request" and r["method"] == "POST"]
    assert [(r["method"], r["path"], r["tenant"], r["status"]) for r in accepted] == [
        ("POST", "/v1/tasks", "dev", 202)
    ], accepted
    assert accepted[0]["level"] == "info" and accepted[0]["timestamp"].endswith("Z")
    pooled = [line["pooled"] for line in ours if line.get("event") == "sandbox started"]
    how = [line["how"] for line in ours if line.get("event") == "agent run"]
    assert pooled == [True] and how == ["launched"], ours


async def test_execute_and_cancel(system: System, fake: FakeModel) -> None:
    fake.script([Text("the answer is 4")], match="what is 2+2")
    hold = asyncio.Event()
    from tests.fakes.model import Reply

    fake.script([Reply(Text("never"), hold=hold)], match="a slow task")
    async with aiohttp.ClientSession() as http:
        body = {"task": "what is 2+2", "auth_token": system.token, "timeout_s": 120}
        async with http.post(f"{system.url}/execute", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["status"] == "succeeded"
        assert answer["result"]["text"] == "the answer is 4"

        async with http.post(
            f"{system.url}/v1/tasks", json={"prompt": "a slow task"}, headers=system.headers()
        ) as r:
            task_id = (await r.json())["task_id"]
        await fake.wait_for(lambda: fake.conversations_matching("a slow task") == 1, within=60)
        async with http.delete(f"{system.url}/v1/tasks/{task_id}", headers=system.headers()) as r:
            assert r.status == 202
        async with http.get(
            f"{system.url}/v1/tasks/{task_id}?wait=60", headers=system.headers()
        ) as r:
            view = await r.json()
        assert view["status"] == "cancelled"
        hold.set()
        # the container is removed once the cancellation is handled
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while sandbox_names(task_id):
            assert loop.time() < deadline, "the cancelled task's container is still there"
            await asyncio.sleep(0.2)


async def test_s3_storage_with_an_outage(
    tmp_path: Path, fake: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results go to S3 (moto on loopback); while S3 is down the task waits, then stores once."""
    if not docker_available():
        pytest.skip("needs a running Docker engine and the sandbox image (make image)")
    env = fake_aws_env(monkeypatch)
    s3 = MotoS3()
    s3.start()
    bucket = await s3.create_bucket()
    system = await start_up(
        tmp_path,
        fake,
        {
            **env,
            "SANDSTREAM_STORAGE_URL": f"s3://{bucket}/runs",
            "SANDSTREAM_S3_ENDPOINT_URL": s3.endpoint_url,
        },
    )
    try:
        prompt = "write notes.md while storage is down"
        fake.script([ToolUse.write("notes.md", "# notes\n"), Text("done with notes")], match=prompt)
        s3.stop()  # storage refuses every write from now on
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{system.url}/v1/tasks", json={"prompt": prompt}, headers=system.headers()
            ) as r:
                task_id = (await r.json())["task_id"]
            # the sandbox is gone and the result is waiting for storage
            async with http.get(
                f"{system.url}/v1/tasks/{task_id}?wait=20", headers=system.headers()
            ) as r:
                assert (await r.json())["status"] == "storing"
            nc = await connect(system.nats_url, name="check", auth=system.reader())
            bus = Bus(nc)
            await wait_for_event(bus, task_id, "SandboxStopped", timeout=60)
            assert await bus.last(task_id, "ResultStored") is None
            s3.start()  # storage is back: the retried write lands
            async with http.get(
                f"{system.url}/v1/tasks/{task_id}?wait=60", headers=system.headers()
            ) as r:
                view = await r.json()
            assert view["status"] == "succeeded", view
            assert view["result"]["text"] == "done with notes"
            # The workspace is kept for follow-ups only when the store takes it at the end
            # of the run: the run does not wait for it (storage waits, with the result).
            assert view["result"]["warnings"] == ["workspace_not_kept"]
            stored = [r.event async for r in bus.read(bus.subject(task_id, "ResultStored"))]
            await nc.close()
        assert len(stored) == 1
        event = stored[0]
        assert isinstance(event, ev.ResultStored)
        async with s3.client() as client:
            # keys in the event are relative to the store's prefix (`runs/`)
            assert sorted(o.key for o in event.objects) == [
                f"tasks/{task_id}/{name}"
                for name in ("diff.patch", "result.json", "transcript.jsonl")
            ]
            for obj in event.objects:
                answer = await client.get_object(Bucket=bucket, Key=f"runs/{obj.key}")
                body = await answer["Body"].read()
                assert hashlib.sha256(body).hexdigest() == obj.sha256
    finally:
        stop_up(system)
        s3.stop()


async def test_cli_submit_wait_and_a_crashed_service_is_restarted(
    system: System, fake: FakeModel
) -> None:
    """`sandstream submit --wait` shows the task live; `up` restarts a service killed with -9."""
    log = system.log.read_text()
    executor_pid = int(re.findall(r'"service": ?"executor", ?"pid": ?(\d+)', log)[-1])
    os.kill(executor_pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "service died, restarting" not in system.log.read_text():
        assert loop.time() < deadline, "up did not notice the dead executor"
        await asyncio.sleep(0.1)

    prompt = "say hello from the cli"
    fake.script([Text("hello from the cli")], match=prompt)
    env = dict(os.environ, SANDSTREAM_URL=system.url, SANDSTREAM_TOKEN=system.token)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "submit", prompt, "--wait"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = [line.split()[2] for line in lines if line.strip().startswith("+")]
    assert names[0] == "TaskRequested" and names[-1] == "TaskSucceeded"
    assert "ExecutionCompleted" in names
    assert lines[-1] == "hello from the cli"
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.cli", "tasks"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert [line.split()[1] for line in listed.stdout.splitlines()] == ["succeeded"]
    # the restarted executor ran it: a new executor pid was logged
    pids = re.findall(r'"service": ?"executor", ?"pid": ?(\d+)', system.log.read_text())
    assert int(pids[-1]) != executor_pid


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


async def test_secrets_stay_with_the_process_that_uses_them(system: System) -> None:
    """Only the model proxy has the model credential, and it runs without rights to Docker."""
    found = {}
    for child in children_of(system.proc.pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        name = next(
            (a.decode().removeprefix("services.") for a in cmdline if a.startswith(b"services.")),
            "nats-server" if cmdline and cmdline[0].endswith(b"nats-server") else None,
        )
        if name:
            found[name] = (child, environ_of(child))
    assert set(found) == {
        "nats-server", "gateway", "lifecycle", "executor", "storage", "modelproxy"
    }  # fmt: skip
    for name, (_, env) in found.items():
        assert (env.get("ANTHROPIC_API_KEY") == SECRET) == (name == "modelproxy"), name
        assert SECRET not in str(env) or name == "modelproxy", name
        if name not in ("nats-server", "modelproxy"):  # each bus service connects as itself
            assert env["SANDSTREAM_NATS_NKEY"].endswith(f"/nats/{name}.nk")
    # The model proxy has no bus identity and, `up` being root here, runs as the sandbox's
    # uid without supplementary groups: the Docker socket is closed to it. (It says so once it
    # has dropped root, which may come after the gateway is ready.)
    pid, env = found["modelproxy"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while '"model proxy running"' not in system.log.read_text():
        assert loop.time() < deadline, "the model proxy did not start"
        await asyncio.sleep(0.05)
    assert "SANDSTREAM_NATS_NKEY" not in env
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["1000"] * 4 and status["Gid"].split() == ["1000"] * 4
    assert status["Groups"].strip() == ""
    # The same rights, tried: root reaches the engine, uid 1000 without groups does not.
    probes = [
        await asyncio.to_thread(
            subprocess.run,  # type: ignore[arg-type]
            ["curl", "-sS", "--unix-socket", "/var/run/docker.sock", "http://docker/_ping"],
            capture_output=True, text=True, timeout=30, **rights,
        )
        for rights in ({}, {"user": 1000, "group": 1000, "extra_groups": []})
    ]  # fmt: skip
    assert probes[0].stdout == "OK", probes[0].stderr
    assert probes[1].returncode == 7 and probes[1].stdout == "", probes[1]  # cannot connect
    # The data dir is private; the bus refuses a connection without an identity.
    assert system.data_dir.stat().st_mode & 0o077 == 0
    with pytest.raises(Unavailable):
        await connect(system.nats_url, name="anonymous", connect_timeout=1.0)


async def test_a_forged_request_removes_nothing(
    system: System, fake: FakeModel, tmp_path: Path
) -> None:
    """The review's reproduction, against `up`: with the gateway's own identity (the only
    one that may publish TaskRequested) a request naming a folder, its deadline long past."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    gateway = NatsAuth(nkey=seed_path(system.data_dir / "nats", "gateway"))
    nc = await connect(system.nats_url, name="forger", auth=gateway)
    forged = ev.TaskRequested(
        event_id=ev.event_id(str(victim), "TaskRequested"),
        task_id=str(victim),
        tenant="dev",
        spec=ev.TaskSpec(prompt="x", timeout_s=1),
        at=ev.now() - timedelta(days=1),
    )
    await nc.jetstream().publish(f"tasks.{victim}.TaskRequested", ev.encode(forged))
    await nc.close()
    # An honest task after it: once it has ended, the lifecycle has handled the forgery.
    fake.script([Text("after the forgery")], match="after the forgery")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.url}/v1/tasks", json={"prompt": "after the forgery"}, headers=system.headers()
        ) as r:
            task_id = (await r.json())["task_id"]
        async with http.get(
            f"{system.url}/v1/tasks/{task_id}?wait=60", headers=system.headers()
        ) as r:
            assert (await r.json())["status"] == "succeeded"
    assert (victim / "precious").read_text() == "keep me"
    assert "untrusted event terminated" in system.log.read_text()


async def test_a_repository_in_and_a_pushed_branch_out(tmp_path: Path, fake: FakeModel) -> None:
    """The whole way: a tenant secret set with the CLI, a task with a repository over smart
    HTTP with authentication; the agent edits a checked-out file; the origin gets a branch
    with exactly that change, the bundle is served, and the secret is nowhere."""
    if not docker_available():
        pytest.skip("needs a running Docker engine and the sandbox image (make image)")
    repos = tmp_path / "repos"
    bare = make_repo(repos, "app", {"README.md": "hello\n", "src/app.py": "x = 1\n"})
    base = rev(bare, "main")
    password = "gitpw-e2e-" + hashlib.sha256(os.urandom(16)).hexdigest()[:20]
    prompt = "fix the greeting in the checked-out repository"
    fake.script(
        [
            ToolUse.read("README.md"),
            ToolUse.edit("README.md", "hello", "goodbye"),
            Text("fixed the greeting"),
        ],
        match=prompt,
    )
    async with GitHttpServer(repos, user="x-access-token", password=password) as server:
        up = await start_up(tmp_path, fake)
        try:
            subprocess.run(
                [sys.executable, "-m", "services.cli", "secret", "set", "--tenant", "dev", "gh"],
                input=password.encode(),
                env=dict(os.environ, SANDSTREAM_DATA_DIR=str(up.data_dir)),
                capture_output=True,
                timeout=30,
                check=True,
            )
            body = {
                "prompt": prompt,
                "timeout_s": 120,
                "repo": {"url": f"{server.url}/app.git", "ref": "main", "credential": "gh"},
                "output": {"branch": "sandstream/greeting", "push": True},
            }
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{up.url}/v1/tasks", json=body, headers=up.headers()) as r:
                    assert r.status == 202, await r.text()
                    task_id = (await r.json())["task_id"]
                events = await read_sse(http, up, task_id)
                async with http.get(
                    f"{up.url}/v1/tasks/{task_id}/result", headers=up.headers()
                ) as r:
                    result = await r.json()
                async with http.get(
                    f"{up.url}/v1/tasks/{task_id}/artifacts/changes.bundle", headers=up.headers()
                ) as r:
                    assert r.status == 200
                    bundle = await r.read()
                    etag = r.headers["ETag"]
                # A ref the repository does not have: failed before the agent, no sandbox left.
                body["repo"] = {**body["repo"], "ref": "no-such-branch"}  # type: ignore[dict-item]
                async with http.post(f"{up.url}/v1/tasks", json=body, headers=up.headers()) as r:
                    missing = (await r.json())["task_id"]
                missing_events = await read_sse(http, up, missing)
                async with http.get(f"{up.url}/v1/tasks/{missing}", headers=up.headers()) as r:
                    missing_view = await r.json()
        finally:
            stop_up(up)
    assert [n for _, n, _ in missing_events][-1] == "TaskFailed"
    assert missing_view["error"]["code"] == "workspace_error"
    assert "no branch, tag or commit 'no-such-branch'" in missing_view["error"]["message"]
    assert "ExecutionStarted" not in [n for _, n, _ in missing_events]
    assert sandbox_names(missing) == []
    types = [name for _, name, _ in events]
    assert types[-1] == "TaskSucceeded", (types, result)
    assert types.index("WorkspacePrepared") < types.index("ExecutionStarted")
    assert types.index("BranchPushed") < types.index("ExecutionCompleted")
    assert result["repo"] == {"url": f"{server.url}/app.git", "ref": "main", "commit": base}
    branch = result["branch"]
    assert branch["pushed"] and branch["base"] == base
    assert branch["commit"] == rev(bare, "sandstream/greeting")
    assert git("diff", "--name-only", base, "sandstream/greeting", cwd=bare).split() == [
        "README.md"
    ]
    assert git("show", "sandstream/greeting:README.md", cwd=bare) == "goodbye\n"
    assert result["files_changed"] == ["README.md"] and "+goodbye" in result["diff"]
    assert etag == f'"{hashlib.sha256(bundle).hexdigest()}"'
    (tmp_path / "changes.bundle").write_bytes(bundle)
    clone = tmp_path / "clone"
    git("clone", "-q", str(bare), str(clone))
    git("fetch", "-q", str(tmp_path / "changes.bundle"), "sandstream/greeting:b", cwd=clone)
    assert rev(clone, "b") == branch["commit"]
    assert password not in up.log.read_text() and password not in json.dumps(events)
    assert password not in json.dumps(result)
    assert sandbox_names(task_id) == []
