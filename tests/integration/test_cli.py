"""The `sandstream` command as a user runs it: tokens, replay, and behaving like a Unix tool."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from shared import events as ev
from shared.bus import Bus, StreamSettings
from shared.tokens import TokenStore
from tests.support.gateway import Gateway
from tests.support.procs import NatsServer


def sandstream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_token_create_prints_only_the_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    done = sandstream("token", "create", "--tenant", "acme", "--tokens-file", str(tokens))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n" and token.startswith("sst_")
    assert "acme" in done.stderr
    assert token not in tokens.read_text()  # only its hash is stored
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    assert TokenStore(tokens).tenant_for(token) == "acme"


def test_token_create_rejects_a_bad_tenant(tmp_path: Path) -> None:
    done = sandstream(
        "token", "create", "--tenant", "Bad Name", "--tokens-file", str(tmp_path / "t")
    )
    assert done.returncode == 2 and "tenant must be" in done.stderr


async def test_replay_lists_events_in_stream_order(bus: Bus, nats_server: NatsServer) -> None:
    a, b = ev.new_task_id(), ev.new_task_id()
    published = [
        ev.TaskRequested(
            event_id=ev.event_id(a, "TaskRequested"),
            task_id=a,
            tenant="x",
            spec=ev.TaskSpec(prompt="first"),
        ),
        ev.TaskRequested(
            event_id=ev.event_id(b, "TaskRequested"),
            task_id=b,
            tenant="x",
            spec=ev.TaskSpec(prompt="second"),
        ),
        ev.SandboxStarted(
            event_id=ev.event_id(a, "SandboxStarted"),
            task_id=a,
            tenant="x",
            sandbox=f"sandstream-{a}",
            image="img",
        ),
        ev.TaskFailed(
            event_id=ev.terminal_id(a),
            task_id=a,
            tenant="x",
            error=ev.ErrorInfo(code="cli_error", message="exit 1"),
        ),
    ]
    for event in published:
        await bus.publish(event)
    env = {
        **nats_server.env("reader"),
        "SANDSTREAM_STREAM": bus.stream.name,
        "SANDSTREAM_SUBJECT_PREFIX": bus.prefix,
    }

    as_json = sandstream("replay", a, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["seq"], e["type"]) for e in lines] == [
        (1, "TaskRequested"),
        (3, "SandboxStarted"),
        (4, "TaskFailed"),
    ]
    assert lines[0]["subject"] == f"{bus.prefix}.{a}.TaskRequested"
    assert lines[0]["spec"]["prompt"] == "first" and lines[0]["event_id"] == f"{a}:TaskRequested:1"

    timeline = sandstream("replay", a, env=env).stdout.splitlines()
    assert [line.split()[2] for line in timeline] == [
        "TaskRequested",
        "SandboxStarted",
        "TaskFailed",
    ]
    assert "cli_error: exit 1" in timeline[-1]

    everything = sandstream("replay", "--json", "--from-seq", "2", env=env).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in everything] == [2, 3, 4]
    only = sandstream("replay", "--json", "--type", "TaskRequested", env=env).stdout.splitlines()
    assert [json.loads(line)["task_id"] for line in only] == [a, b]


def test_replay_without_a_server_fails_clearly() -> None:
    done = sandstream("replay", env={"SANDSTREAM_NATS_URL": "nats://127.0.0.1:1"})
    assert done.returncode == 1 and "cannot reach NATS" in done.stderr


async def test_replay_into_a_reader_that_stops_early_exits_quietly(
    bus: Bus, nats_server: NatsServer
) -> None:
    # Far more than a pipe buffer holds, so the writer meets the closed pipe for sure.
    task_id = ev.new_task_id()
    for i in range(1, 2001):
        await bus.publish(
            ev.AgentOutput(
                event_id=f"{task_id}:AgentOutput:{i}",
                task_id=task_id,
                tenant="x",
                batch=i,
                lines=["x" * 400],
            )
        )
    env = {
        **os.environ,
        **nats_server.env("reader"),
        "SANDSTREAM_STREAM": bus.stream.name,
        "SANDSTREAM_SUBJECT_PREFIX": bus.prefix,
    }
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; {sys.executable} -m services.cli replay --json | head -1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1
    assert json.loads(done.stdout)["task_id"] == task_id


async def test_ctrl_c_in_events_follow_exits_quietly(
    bus: Bus, nats_server: NatsServer, stream_settings: StreamSettings, tmp_path: Path
) -> None:
    async with Gateway(nats_server, stream_settings, tmp_path) as gateway:
        token = gateway.token("acme")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gateway.url}/v1/tasks",
                json={"prompt": "p"},
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            task_id = (await r.json())["task_id"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "events",
            task_id,
            "--follow",
            env={**os.environ, "SANDSTREAM_URL": gateway.url, "SANDSTREAM_TOKEN": token},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        # The task never ends (no lifecycle runs here): the command follows until interrupted.
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"TaskRequested" in first
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
        stderr = (await proc.stderr.read()).decode()
        assert code == 130, stderr
        assert "Traceback" not in stderr and stderr.strip() == "", stderr
