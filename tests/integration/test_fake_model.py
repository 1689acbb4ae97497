"""The scripted fake Messages API, over raw HTTP and driving the real Claude Code CLI on the host.

The CLI tests need the pinned CLI (installed by ``tests/fakes/claude_cli.sh`` into ``.cache``);
they are skipped, with the installer's reason, when it cannot be installed.
Run standalone with ``pytest -o asyncio_mode=auto tests/integration/test_fake_model.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fakes.model import FakeModel, Reply, Text, ToolUse

INSTALLER = Path(__file__).resolve().parents[1] / "fakes" / "claude_cli.sh"
API_KEY = "test-key-xyz"


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """Path of the pinned native CLI binary; skips the test when it cannot be installed."""
    try:
        done = subprocess.run(
            ["bash", str(INSTALLER)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Claude Code CLI could not be installed: {exc}")
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not os.access(path, os.X_OK):
        reason = done.stderr.strip()[-500:] or f"installer exited {done.returncode}"
        pytest.skip(f"Claude Code CLI could not be installed: {reason}")
    return path


@pytest_asyncio.fixture
async def fake_model() -> AsyncIterator[FakeModel]:
    async with FakeModel() as fake:
        yield fake


@dataclass
class CliRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    cwd: Path

    @property
    def result(self) -> dict[str, Any]:
        """The final ``result`` line of the stream-json output."""
        assert self.events, f"no output; stderr: {self.stderr[-2000:]}"
        last = self.events[-1]
        assert last["type"] == "result", last
        return last


async def run_claude(
    claude_bin: str,
    fake: FakeModel,
    prompt: str,
    tmp_path: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    limit: float = 60.0,
) -> CliRun:
    """Run ``claude -p`` against ``fake`` with its own HOME and working dir under tmp_path."""
    run_dir = tmp_path / uuid.uuid4().hex[:8]
    home, cwd = run_dir / "home", run_dir / "work"
    home.mkdir(parents=True)
    cwd.mkdir()
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **(env or {}),
    }
    args = ["-p", prompt, "--output-format", "stream-json", "--verbose"]
    args += ["--permission-mode", "acceptEdits", *extra]
    proc = await asyncio.create_subprocess_exec(
        claude_bin,
        *args,
        cwd=cwd,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return CliRun(proc.returncode or 0, events, err.decode(errors="replace"), cwd)


def marker() -> str:
    return f"task-{uuid.uuid4().hex[:12]}"


# ---- the real CLI against the fake -------------------------------------------------------


async def test_text_reply_becomes_the_result(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    fake_model.script(
        match=tag, replies=[Reply(Text("Hello from the fake."), input_tokens=123, output_tokens=45)]
    )
    run = await run_claude(claude_bin, fake_model, f"say hello {tag}", tmp_path)

    assert run.returncode == 0, run.stderr
    result = run.result
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["result"] == "Hello from the fake."
    assert result["num_turns"] == 1
    assert result["usage"]["input_tokens"] == 123
    assert result["usage"]["output_tokens"] == 45
    assert result["total_cost_usd"] > 0
    assert [r.reply_index for r in fake_model.main_requests()] == [0]


async def test_write_tool_call_creates_the_file_in_cwd(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    fake_model.script(
        match=tag,
        replies=[ToolUse.write("hello.txt", "hi\n"), Text("Wrote hello.txt")],
    )
    run = await run_claude(claude_bin, fake_model, f"write a file {tag}", tmp_path)

    assert run.returncode == 0, run.stderr
    assert run.result["is_error"] is False
    assert run.result["result"] == "Wrote hello.txt"
    assert run.result["permission_denials"] == []
    assert (run.cwd / "hello.txt").read_text() == "hi\n"
    (main1, main2) = fake_model.main_requests()
    assert main1.cwd == str(run.cwd)
    # The second turn carries the tool result back.
    last_user = main2.body["messages"][-1]
    assert any(block.get("type") == "tool_result" for block in last_user["content"])


async def test_bash_is_denied_under_accept_edits(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    # Read-only commands (echo, ls, pwd) and file edits inside cwd (touch) are auto-allowed
    # under acceptEdits; running an interpreter is not.
    command = "python3 -c 'print(42)'"
    fake_model.script(match=tag, replies=[ToolUse.bash(command), Text("could not run it")])
    run = await run_claude(claude_bin, fake_model, f"run something {tag}", tmp_path)

    assert run.returncode == 0, run.stderr
    denials = run.result["permission_denials"]
    assert [(d["tool_name"], d["tool_input"]["command"]) for d in denials] == [("Bash", command)]
    assert run.result["result"] == "could not run it"


async def test_fake_records_the_api_key(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    fake_model.script(match=tag, replies=[Text("ok")])
    run = await run_claude(claude_bin, fake_model, f"hi {tag}", tmp_path)

    assert run.returncode == 0, run.stderr
    assert fake_model.requests
    assert {r.api_key for r in fake_model.requests} == {API_KEY}
    main = fake_model.main_requests()
    assert main and all(r.headers["x-claude-code-session-id"] for r in main)


async def test_two_runs_are_two_conversations(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag, other = marker(), marker()
    fake_model.script(match=tag, replies=[ToolUse.write("a.txt", "a"), Text("first")])
    fake_model.script(replies=[Text("default")])
    runs = await asyncio.gather(
        run_claude(claude_bin, fake_model, f"job {tag}", tmp_path),
        run_claude(claude_bin, fake_model, f"job {tag}", tmp_path),
        run_claude(claude_bin, fake_model, f"job {other}", tmp_path),
    )

    assert [r.result["result"] for r in runs] == ["first", "first", "default"]
    assert len(fake_model.conversations) == 3
    assert fake_model.conversations_matching(tag) == 2
    assert fake_model.conversations_matching(other) == 1
    assert fake_model.conversations_matching("no such prompt") == 0
    assert {r.result["session_id"] for r in runs[:2]} == {
        c for c in fake_model.conversations if tag in fake_model.prompt(c)
    }


async def test_exhausted_script_ends_with_done(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    fake_model.script(match=tag, replies=[ToolUse.write("x.txt", "x")])
    run = await run_claude(claude_bin, fake_model, f"do {tag}", tmp_path)

    assert run.result["result"] == "done"
    assert (run.cwd / "x.txt").read_text() == "x"


async def test_overloaded_model_call_is_retried_within_one_run(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    fake_model.script(match=tag, replies=[Text("survived")])
    fake_model.fail_next(1, status=529, match=tag)
    run = await run_claude(claude_bin, fake_model, f"flaky {tag}", tmp_path)

    assert run.result["result"] == "survived"
    assert [r.status for r in fake_model.main_requests()] == [529, 200]
    assert fake_model.conversations_matching(tag) == 1


async def test_held_reply_keeps_the_run_waiting(
    claude_bin: str, fake_model: FakeModel, tmp_path: Path
) -> None:
    tag = marker()
    release = asyncio.Event()
    fake_model.script(match=tag, replies=[Reply(Text("released"), hold=release)])
    task = asyncio.create_task(run_claude(claude_bin, fake_model, f"wait {tag}", tmp_path))
    try:
        await fake_model.wait_for(lambda: fake_model.conversations_matching(tag) == 1, 30)
        assert not task.done()
    finally:
        release.set()
    run = await task
    assert run.result["result"] == "released"


# ---- the fake over raw HTTP --------------------------------------------------------------


def _sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def _request(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 1000,
        "tools": [{"name": "Write", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
            {
                "role": "system",
                "content": [{"type": "text", "text": " - Primary working directory: /w/dir\n"}],
            },
        ],
        **extra,
    }


async def test_streaming_event_sequence(fake_model: FakeModel) -> None:
    fake_model.script(
        replies=[[Text("Let me write."), ToolUse.write("f.txt", "x" * 100), ToolUse.bash("ls")]]
    )
    headers = {"x-claude-code-session-id": "s1", "x-api-key": "k1"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{fake_model.url}/v1/messages?beta=true",
            json=_request("go", stream=True),
            headers=headers,
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = _sse_events(await resp.text())

    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"]
    partial = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == 1
    )
    assert json.loads(partial) == {"file_path": "/w/dir/f.txt", "content": "x" * 100}
    text = "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["index"] == 0
    )
    assert text == "Let me write."
    (delta,) = [d for n, d in events if n == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] == 20
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 100
    rec = fake_model.requests[-1]
    assert (rec.kind, rec.conversation_id, rec.api_key, rec.reply_index) == ("main", "s1", "k1", 0)
    assert rec.query == {"beta": "true"}


async def test_non_streaming_reply_and_history_indexing(fake_model: FakeModel) -> None:
    fake_model.script(match="abc", replies=[ToolUse.bash("ls"), Text("second")])
    url = f"{fake_model.url}/v1/messages"
    async with aiohttp.ClientSession() as http:
        first = await (await http.post(url, json=_request("abc"))).json()
        assert first["type"] == "message" and first["stop_reason"] == "tool_use"
        assert first["content"][0]["input"]["command"] == "ls"
        body = _request("abc")
        body["messages"] += [
            {"role": "assistant", "content": first["content"]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": ""}],
            },
        ]
        # The same request twice (a retry) gets the same reply.
        for _ in range(2):
            second = await (await http.post(url, json=body)).json()
            assert second["content"] == [{"type": "text", "text": "second"}]
            assert second["stop_reason"] == "end_turn"
    # No session header: the conversation is keyed by a hash of the prompt.
    assert len(fake_model.conversations) == 1
    assert fake_model.conversations[0].startswith("h:")


async def test_side_requests_do_not_consume_the_script(fake_model: FakeModel) -> None:
    fake_model.script(replies=[Text("main reply")])
    url = f"{fake_model.url}/v1/messages"
    headers = {"x-claude-code-session-id": "s2"}
    probe = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]}
    title = {"model": "m", "max_tokens": 512, "messages": [{"role": "user", "content": "title?"}]}
    sub = _request("a sub-agent task")
    async with aiohttp.ClientSession() as http:
        main = await (await http.post(url, json=_request("task"), headers=headers)).json()
        for body in (probe, title, sub):
            side = await (await http.post(url, json=body, headers=headers)).json()
            assert side["content"] == [{"type": "text", "text": "ok"}]
            assert side["usage"]["input_tokens"] == 0
    assert main["content"][0]["text"] == "main reply"
    assert [r.kind for r in fake_model.requests] == ["main", "side", "side", "side"]
    assert fake_model.conversations == ["s2"]


async def test_count_tokens_404_and_failures(fake_model: FakeModel) -> None:
    fake_model.fail_next(2, status=500)
    async with aiohttp.ClientSession() as http:
        count = await http.post(f"{fake_model.url}/v1/messages/count_tokens", json=_request("x"))
        assert count.status == 200
        assert (await count.json())["input_tokens"] > 0

        missing = await http.get(f"{fake_model.url}/v1/models")
        assert missing.status == 404
        error = await missing.json()
        assert error["type"] == "error" and error["error"]["type"] == "not_found_error"

        statuses = []
        for _ in range(3):
            resp = await http.post(f"{fake_model.url}/v1/messages", json=_request("x"))
            statuses.append(resp.status)
            if resp.status == 500:
                assert (await resp.json())["error"]["type"] == "api_error"
                assert "retry-after-ms" in resp.headers
        assert statuses == [500, 500, 200]


async def test_delay_postpones_the_content(fake_model: FakeModel) -> None:
    fake_model.script(replies=[Reply(Text("slow"), delay=0.3)])
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        started = loop.time()
        resp = await http.post(f"{fake_model.url}/v1/messages", json=_request("x"))
        assert (await resp.json())["content"][0]["text"] == "slow"
        assert loop.time() - started >= 0.3
