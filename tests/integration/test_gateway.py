"""The gateway against a real nats-server: submission, validation, idempotency, tenants."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.gateway.keys import LIMITS, PROJECTION
from shared import events as ev
from shared import inputs
from shared.blobstore import open_store
from shared.bus import Bus, StreamSettings
from shared.errors import Conflict
from tests.support.gateway import Gateway
from tests.support.procs import NatsServer


@pytest.fixture
async def gateway(
    nats_server: NatsServer, stream_settings: StreamSettings, bus: Bus, tmp_path: Path
) -> AsyncIterator[Gateway]:
    async with Gateway(nats_server, stream_settings, tmp_path) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def events_of(bus: Bus, task_id: str | None = None) -> list[tuple[str, ev.AnyEvent]]:
    subject = bus.task_filter(task_id) if task_id else None
    return [(r.subject, r.event) async for r in bus.read(subject)]


async def test_submission_publishes_one_task_requested(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    body = {"prompt": "fix the test", "timeout_s": 30, "metadata": {"ticket": "T-1"}}
    async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(token)) as r:
        assert r.status == 202
        accepted = await r.json()
    task_id = accepted["task_id"]
    assert accepted["status"] == "queued"
    assert accepted["links"] == {
        "self": f"/v1/tasks/{task_id}",
        "events": f"/v1/tasks/{task_id}/events",
        "result": f"/v1/tasks/{task_id}/result",
    }
    stored = await events_of(bus)
    assert len(stored) == 1
    subject, event = stored[0]
    assert subject == f"{bus.prefix}.{task_id}.TaskRequested"
    assert isinstance(event, ev.TaskRequested)
    assert event.event_id == f"{task_id}:TaskRequested:1"
    assert event.tenant == "acme" and event.task_id == task_id and event.v == 1
    assert event.spec.prompt == "fix the test" and event.spec.timeout_s == 30
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}", headers=auth(token)) as r:
        assert r.status == 200
        view = await r.json()
    assert view["status"] == "queued" and view["metadata"] == {"ticket": "T-1"}


LONG = "x" * 100_001
BAD_REQUESTS: list[tuple[str, dict[str, str] | None, Any, int, str, str | None]] = [
    # (name, headers (None = valid auth), body, status, code, field)
    ("no auth", {}, {"prompt": "x"}, 401, "unauthorized", None),
    ("wrong scheme", {"Authorization": "Basic abc"}, {"prompt": "x"}, 401, "unauthorized", None),
    (
        "unknown token",
        {"Authorization": "Bearer sst_nope"},
        {"prompt": "x"},
        401,
        "unauthorized",
        None,
    ),
    ("empty bearer", {"Authorization": "Bearer "}, {"prompt": "x"}, 401, "unauthorized", None),
    ("not json", None, b"{nope", 400, "invalid_json", None),
    ("empty body", None, b"", 400, "invalid_json", None),
    ("array body", None, [1, 2], 400, "invalid_body", None),
    ("string body", None, "prompt", 400, "invalid_body", None),
    ("missing prompt", None, {}, 422, "missing_field", "prompt"),
    ("empty prompt", None, {"prompt": ""}, 422, "invalid_field", "prompt"),
    ("prompt too long", None, {"prompt": LONG}, 422, "invalid_field", "prompt"),
    ("prompt not string", None, {"prompt": 5}, 422, "invalid_field", "prompt"),
    ("timeout zero", None, {"prompt": "x", "timeout_s": 0}, 422, "invalid_field", "timeout_s"),
    (
        "timeout too big",
        None,
        {"prompt": "x", "timeout_s": 3601},
        422,
        "invalid_field",
        "timeout_s",
    ),
    ("timeout float", None, {"prompt": "x", "timeout_s": 1.5}, 422, "invalid_field", "timeout_s"),
    ("timeout string", None, {"prompt": "x", "timeout_s": "10"}, 422, "invalid_field", "timeout_s"),
    ("max_turns zero", None, {"prompt": "x", "max_turns": 0}, 422, "invalid_field", "max_turns"),
    ("max_turns big", None, {"prompt": "x", "max_turns": 501}, 422, "invalid_field", "max_turns"),
    ("max_tokens zero", None, {"prompt": "x", "max_tokens": 0}, 422, "invalid_field", "max_tokens"),
    (
        "budget not positive",
        None,
        {"prompt": "x", "max_budget_usd": 0},
        422,
        "invalid_field",
        "max_budget_usd",
    ),
    (
        "budget a string",
        None,
        {"prompt": "x", "max_budget_usd": "5"},
        422,
        "invalid_field",
        "max_budget_usd",
    ),
    (
        "tools not list",
        None,
        {"prompt": "x", "allowed_tools": "Bash"},
        422,
        "invalid_field",
        "allowed_tools",
    ),
    (
        "tool not string",
        None,
        {"prompt": "x", "allowed_tools": [1]},
        422,
        "invalid_field",
        "allowed_tools[0]",
    ),
    (
        "metadata value",
        None,
        {"prompt": "x", "metadata": {"a": 1}},
        422,
        "invalid_field",
        "metadata",
    ),
    (
        "metadata too many",
        None,
        {"prompt": "x", "metadata": {str(i): "v" for i in range(33)}},
        422,
        "invalid_field",
        "metadata",
    ),
    ("unknown field", None, {"prompt": "x", "priority": 1}, 422, "unknown_field", "priority"),
    ("repo without url", None, {"prompt": "x", "repo": {}}, 422, "missing_field", "repo.url"),
    *(
        (f"repo url {why}", None, {"prompt": "x", "repo": {"url": url}}, 422, code, "repo.url")
        for why, url, code in (
            ("ext transport", "ext::sh -c touch% /tmp/pwned", "invalid_field"),
            ("option", "--upload-pack=touch /tmp/pwned", "invalid_field"),
            ("ext without spaces", "ext::sh%20-c%20id", "invalid_field"),
            ("option without spaces", "--upload-pack=id", "invalid_field"),
            ("scp-like", "git@example.com:org/app.git", "invalid_field"),
            ("file off", "file:///srv/app.git", "invalid_field"),
            ("password", "https://user:pw@example.com/app.git", "invalid_field"),
            ("user on https", "https://token@example.com/app.git", "invalid_field"),
            ("no host", "https:///app.git", "invalid_field"),
            ("query", "https://example.com/app.git?x=1", "invalid_field"),
            ("control char", "https://example.com/a\npp.git", "invalid_field"),
        )
    ),
    *(
        (
            f"repo ref {why}",
            None,
            {"prompt": "x", "repo": {"url": "https://h/a", "ref": ref}},
            422,
            "invalid_field",
            "repo.ref",
        )
        for why, ref in (
            ("option", "--output=/tmp/x"),
            ("dots", "main..other"),
            ("reflog", "main@{1}"),
            ("space", "a b"),
        )
    ),
    *(
        (f"output {why}", None, {"prompt": "x", **body}, 422, "invalid_field", field)
        for why, body, field in (
            ("without repo", {"output": {"branch": "fix"}}, "output.branch"),
            (
                "push without branch",
                {"repo": {"url": "https://h/a"}, "output": {"push": True}},
                "output.push",
            ),
            (
                "branch dots",
                {"repo": {"url": "https://h/a"}, "output": {"branch": "a..b"}},
                "output.branch",
            ),
            (
                "branch option",
                {"repo": {"url": "https://h/a"}, "output": {"branch": "-f"}},
                "output.branch",
            ),
            (
                "branch dot part",
                {"repo": {"url": "https://h/a"}, "output": {"branch": "a/.b"}},
                "output.branch",
            ),
            ("artifact absolute", {"output": {"artifacts": ["/etc/*"]}}, "output.artifacts[0]"),
            ("artifact parent", {"output": {"artifacts": ["a", "../*"]}}, "output.artifacts[1]"),
            ("artifact empty", {"output": {"artifacts": [""]}}, "output.artifacts[0]"),
        )
    ),
    *(
        (f"network {why}", None, {"prompt": "x", "network": network}, 422, code, field)
        for why, network, code, field in (
            ("no allow", {}, "missing_field", "network.allow"),
            ("url", {"allow": ["https://pypi.org"]}, "invalid_field", "network.allow[0]"),
            ("bad port", {"allow": ["a.org", "b.org:70000"]}, "invalid_field", "network.allow[1]"),
            ("bare star", {"allow": ["*"]}, "invalid_field", "network.allow[0]"),
            ("ipv6", {"allow": ["[::1]:80"]}, "invalid_field", "network.allow[0]"),
            ("unknown preset", {"allow": ["preset:nope"]}, "invalid_field", "network.allow[0]"),
            (
                "too many",
                {"allow": [f"h{i}.org" for i in range(65)]},
                "invalid_field",
                "network.allow",
            ),
        )
    ),
    *(
        (f"agent {why}", None, {"prompt": "x", **body}, 422, code, field)
        for why, body, code, field in (
            ("stall too short", {"stall_timeout_s": 5}, "invalid_field", "stall_timeout_s"),
            ("stall too long", {"stall_timeout_s": 3601}, "invalid_field", "stall_timeout_s"),
            (
                "append NUL",
                {"append_system_prompt": "a\x00b"},
                "invalid_field",
                "append_system_prompt",
            ),
            ("claude_md long", {"claude_md": "x" * 100_001}, "invalid_field", "claude_md"),
            ("settings list", {"settings": ["x"]}, "invalid_field", "settings"),
            ("settings large", {"settings": {"k": "x" * 70_000}}, "invalid_field", "settings"),
            ("schema large", {"json_schema": {"k": "x" * 70_000}}, "invalid_field", "json_schema"),
            (
                "mcp http",
                {"mcp_servers": {"a": {"type": "http", "command": "c"}}},
                "invalid_field",
                "mcp_servers.type",
            ),
            (
                "mcp no command",
                {"mcp_servers": {"a": {}}},
                "missing_field",
                "mcp_servers.command",
            ),
            (
                "mcp bad name",
                {"mcp_servers": {"a b": {"command": "c"}}},
                "invalid_field",
                "mcp_servers",
            ),
            (
                "disallowed not list",
                {"disallowed_tools": "Write"},
                "invalid_field",
                "disallowed_tools",
            ),
            (
                "fail not bool",
                {"fail_on_permission_denial": "yes"},
                "invalid_field",
                "fail_on_permission_denial",
            ),
        )
    ),
    (
        "task too large",
        None,
        {
            "prompt": "\U0001f600" * 100_000,
            "append_system_prompt": "\U0001f600" * 100_000,
            "claude_md": "\U0001f600" * 100_000,
        },
        422,
        "task_too_large",
        None,
    ),
    (
        "repo depth zero",
        None,
        {"prompt": "x", "repo": {"url": "https://h/a", "depth": 0}},
        422,
        "invalid_field",
        "repo.depth",
    ),
    (
        "repo credential name",
        None,
        {"prompt": "x", "repo": {"url": "https://h/a", "credential": "../etc"}},
        422,
        "invalid_field",
        "repo.credential",
    ),
    ("model not string", None, {"prompt": "x", "model": 3}, 422, "invalid_field", "model"),
    ("body too large", None, {"prompt": "x" * (16 * 1024 * 1024)}, 413, "body_too_large", None),
    *(
        (f"files {why}", None, {"prompt": "x", "files": [file]}, 422, "invalid_field", field)
        for why, file, field in (
            ("parent", {"path": "../x", "content_b64": ""}, "files[0].path"),
            ("absolute", {"path": "/etc/x", "content_b64": ""}, "files[0].path"),
            ("into .git", {"path": "a/.GIT/hooks/x", "content_b64": ""}, "files[0].path"),
            ("empty part", {"path": "a//b", "content_b64": ""}, "files[0].path"),
            ("dot part", {"path": "./b", "content_b64": ""}, "files[0].path"),
            ("control char", {"path": "a\nb", "content_b64": ""}, "files[0].path"),
            ("not base64", {"path": "a", "content_b64": "@@@"}, "files[0].content_b64"),
            ("bad mode", {"path": "a", "content_b64": "", "mode": "0777"}, "files[0].mode"),
        )
    ),
    (
        "files unknown key",
        None,
        {"prompt": "x", "files": [{"path": "a", "content_b64": "", "owner": "root"}]},
        422,
        "unknown_field",
        "files[0].owner",
    ),
    (
        "files too many",
        None,
        {"prompt": "x", "files": [{"path": f"f{i}", "content_b64": ""} for i in range(1001)]},
        422,
        "invalid_field",
        "files",
    ),
    (
        "files too big",
        None,
        {
            "prompt": "x",
            "files": [
                {"path": "a", "content_b64": base64.b64encode(b"a" * (6 << 20)).decode()},
                {"path": "b", "content_b64": base64.b64encode(b"b" * (5 << 20)).decode()},
            ],
        },
        422,
        "invalid_field",
        "files",
    ),
    (
        "bad content type",
        {"Content-Type": "text/plain"},
        b'{"prompt": "x"}',
        415,
        "unsupported_media_type",
        None,
    ),
    (
        "idempotency key with space",
        {"Idempotency-Key": "a b"},
        {"prompt": "x"},
        400,
        "invalid_idempotency_key",
        "Idempotency-Key",
    ),
    (
        "idempotency key too long",
        {"Idempotency-Key": "k" * 256},
        {"prompt": "x"},
        400,
        "invalid_idempotency_key",
        "Idempotency-Key",
    ),
]


@pytest.mark.parametrize(
    ("name", "headers", "body", "status", "code", "field"),
    BAD_REQUESTS,
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_requests_are_rejected_and_nothing_is_published(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    bus: Bus,
    name: str,
    headers: dict[str, str] | None,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    token = gateway.token("acme")
    sent = dict(auth(token))
    if headers is not None:
        if "Authorization" in headers or not headers:
            sent.pop("Authorization")
        sent.update(headers)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent.setdefault("Content-Type", "application/json")
    before = await bus.last_sequence()
    async with http.post(f"{gateway.url}/v1/tasks", data=data, headers=sent) as r:
        assert r.status == status, await r.text()
        answer = await r.json()
        if status == 401:
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    assert answer["error"].get("field") == field
    assert await bus.last_sequence() == before


async def test_idempotency_key_same_body_same_task(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    headers = {**auth(token), "Idempotency-Key": "order-42"}
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "a"}, headers=headers) as r:
        assert r.status == 202
        first = (await r.json())["task_id"]
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "a"}, headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["task_id"] == first
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "b"}, headers=headers) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "idempotency_conflict"
    assert len(await events_of(bus)) == 1
    # the key belongs to its tenant: another tenant's same key is another task
    other = {**auth(gateway.token("globex")), "Idempotency-Key": "order-42"}
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "b"}, headers=other) as r:
        assert r.status == 202
        assert (await r.json())["task_id"] != first


async def test_fifty_concurrent_identical_requests_make_one_task(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    headers = {**auth(gateway.token("acme")), "Idempotency-Key": "burst"}

    async def post() -> tuple[int, str]:
        async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "p"}, headers=headers) as r:
            return r.status, (await r.json())["task_id"]

    answers = await asyncio.gather(*(post() for _ in range(50)))
    assert len({task_id for _, task_id in answers}) == 1
    assert sorted(status for status, _ in answers) == [200] * 49 + [202]
    assert len(await events_of(bus)) == 1


async def test_idempotency_holds_after_the_duplicate_window(
    nats_server: NatsServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With a 1 s duplicate window, a replay 1.5 s later still finds the same task."""
    import uuid

    from shared.bus import connect

    tag = uuid.uuid4().hex[:10]
    stream = StreamSettings(name=f"W{tag}", subject_prefix=f"w{tag}", duplicate_window_s=1.0)
    gw = Gateway(nats_server, stream, tmp_path)
    await gw.start()
    try:
        await gw.wait_ready()
        headers = {**auth(gw.token("acme")), "Idempotency-Key": "late"}
        async with http.post(f"{gw.url}/v1/tasks", json={"prompt": "p"}, headers=headers) as r:
            assert r.status == 202
            task_id = (await r.json())["task_id"]
        await asyncio.sleep(1.5)  # the point of the test: outlive the stream's duplicate window
        nc = await connect(nats_server.url, name="check", auth=nats_server.auth())
        raw = Bus(nc, stream)
        stored = await raw.last(task_id, "TaskRequested")
        assert stored is not None
        # the msg-id no longer deduplicates; the per-task expected sequence 0 still refuses
        with pytest.raises(Conflict):
            await raw.publish(stored.event, expected_last_subject_seq=0)
        async with http.post(f"{gw.url}/v1/tasks", json={"prompt": "p"}, headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["task_id"] == task_id
        async with http.post(f"{gw.url}/v1/tasks", json={"prompt": "q"}, headers=headers) as r:
            assert r.status == 409
        info = await nc.jetstream().stream_info(stream.name)
        assert info.state.messages == 1
        await nc.close()
    finally:
        await gw.stop()


async def test_tenants_cannot_see_each_other(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    acme, globex = auth(gateway.token("acme")), auth(gateway.token("globex"))
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "a"}, headers=acme) as r:
        task_id = (await r.json())["task_id"]
    for method, path in (
        ("GET", f"/v1/tasks/{task_id}"),
        ("GET", f"/v1/tasks/{task_id}/events"),
        ("DELETE", f"/v1/tasks/{task_id}"),
    ):
        async with http.request(method, f"{gateway.url}{path}", headers=globex) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["code"] == "not_found"
    async with http.get(f"{gateway.url}/v1/tasks", headers=globex) as r:
        assert (await r.json())["tasks"] == []
    async with http.get(f"{gateway.url}/v1/tasks", headers=acme) as r:
        assert [t["task_id"] for t in (await r.json())["tasks"]] == [task_id]


async def test_projection_is_rebuilt_after_restart(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    bus: Bus,
    nats_server: NatsServer,
    stream_settings: StreamSettings,
    tmp_path: Path,
) -> None:
    token = gateway.token("acme")
    ids = []
    for i in range(3):
        async with http.post(
            f"{gateway.url}/v1/tasks", json={"prompt": str(i)}, headers=auth(token)
        ) as r:
            ids.append((await r.json())["task_id"])
    await bus.publish(
        ev.TaskCancelled(event_id=ev.terminal_id(ids[0]), task_id=ids[0], tenant="acme")
    )
    await gateway.stop()
    again = Gateway(nats_server, stream_settings, tmp_path)
    await again.start()
    try:
        await again.wait_ready()
        statuses = []
        for task_id in ids:
            async with http.get(f"{again.url}/v1/tasks/{task_id}", headers=auth(token)) as r:
                statuses.append((await r.json())["status"])
        assert statuses == ["cancelled", "queued", "queued"]
    finally:
        await again.stop()


async def test_a_task_the_projection_has_not_seen_is_never_a_404(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    """A restarted gateway answers before its projection has caught up (the chaos run saw
    404s for accepted tasks): a task in the stream is waited for, or 503, never 404."""
    token = gateway.token("acme")
    other = auth(gateway.token("globex"))
    task_id = ev.new_task_id()
    await bus.publish(  # as another gateway replica would
        ev.TaskRequested(
            event_id=ev.event_id(task_id, "TaskRequested"),
            task_id=task_id,
            tenant="acme",
            spec=ev.TaskSpec(prompt="elsewhere"),
        )
    )
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}", headers=auth(token)) as r:
        assert r.status == 200
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}", headers=other) as r:
        assert r.status == 404

    # The projection "has not seen it yet" (as while it rebuilds): 503, retry, not 404.
    assert gateway.app is not None
    projection = gateway.app[PROJECTION]
    del projection.tasks[task_id]
    projection.by_tenant["acme"].remove(task_id)
    for path in (f"/v1/tasks/{task_id}", f"/v1/tasks/{task_id}/events"):
        async with http.get(f"{gateway.url}{path}", headers=auth(token)) as r:
            assert r.status == 503, path
            assert r.headers["Retry-After"] == "1"
    async with http.get(f"{gateway.url}/v1/tasks/{ev.new_task_id()}", headers=auth(token)) as r:
        assert r.status == 404  # not in the stream at all
    async with http.get(f"{gateway.url}/v1/tasks/a.b*", headers=auth(token)) as r:
        assert r.status == 404  # not an id: never put into a subject

    projection.ready.clear()  # rebuilding: a partial list would hide tasks
    async with http.get(f"{gateway.url}/v1/tasks", headers=auth(token)) as r:
        assert r.status == 503


async def test_wait_returns_when_the_task_ends(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    """?wait is woken by the task's end: the end is published only once the request is
    parked on it, and the answer must come long before the 30 s the request asked for."""
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "w"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    assert gateway.app is not None
    projection = gateway.app[PROJECTION]

    async def wait_request() -> dict[str, Any]:
        url = f"{gateway.url}/v1/tasks/{task_id}?wait=30"
        async with http.get(url, headers=auth(token)) as r:
            body: dict[str, Any] = await r.json()
            return body

    async with asyncio.timeout(10):  # far below the 30 s the request would otherwise take
        waiting = asyncio.create_task(wait_request())
        while task_id not in projection._waiting:  # the request is parked on the task
            await asyncio.sleep(0.01)
        await bus.publish(
            ev.TaskSucceeded(event_id=ev.terminal_id(task_id), task_id=task_id, tenant="acme")
        )
        view = await waiting
    assert view["status"] == "succeeded"


async def test_nats_down_gives_503_then_recovers(
    nats_server: NatsServer, gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    nats_server.stop()
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with http.post(
            f"{gateway.url}/v1/tasks", json={"prompt": "down"}, headers=auth(token)
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "unavailable"
        assert loop.time() - began < 2.5
        async with http.get(f"{gateway.url}/readyz") as r:
            assert r.status == 503
    finally:
        nats_server.start()
    # the gateway reconnects by itself; wait for the condition, not a guessed time
    deadline = loop.time() + 20
    while True:
        async with http.post(
            f"{gateway.url}/v1/tasks", json={"prompt": "up"}, headers=auth(token)
        ) as r:
            if r.status == 202:
                break
            assert r.status == 503
        assert loop.time() < deadline, "gateway did not recover"
        await asyncio.sleep(0.1)
    prompts = [e.spec.prompt for _, e in await events_of(bus) if isinstance(e, ev.TaskRequested)]
    assert prompts == ["up"]  # the request answered 503 was never published


async def test_metrics_and_openapi_need_no_token(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "m"}, headers=auth(token)) as r:
        assert r.status == 202
    async with http.post(f"{gateway.url}/v1/tasks", json={}, headers=auth(token)) as r:
        assert r.status == 422
    async with http.get(f"{gateway.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert 'sandstream_http_responses_total{route="/v1/tasks",status="202"} 1' in text
    assert 'sandstream_http_responses_total{route="/v1/tasks",status="422"} 1' in text
    assert 'sandstream_tasks{status="queued"} 1' in text
    assert "sandstream_nats_connected 1" in text
    async with http.get(f"{gateway.url}/openapi.json") as r:
        doc = await r.json()
    assert "/v1/tasks" in doc["paths"] and "TaskRequest" in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["TaskRequest"]["properties"]["timeout_s"]["maximum"] == 3600


async def test_sse_history_live_keepalive_and_resume(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.1)
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "s"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    started = ev.SandboxStarted(
        event_id=ev.event_id(task_id, "SandboxStarted"), task_id=task_id, tenant="acme",
        sandbox=f"sandstream-{task_id}", image="img",
    )  # fmt: skip
    ended = ev.TaskSucceeded(event_id=ev.terminal_id(task_id), task_id=task_id, tenant="acme")
    lines: list[str] = []
    url = f"{gateway.url}/v1/tasks/{task_id}/events"
    async with http.get(url, headers=auth(token)) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if line == ": keep-alive" and lines.count(line) == 1:
                await bus.publish(started)  # live, after the history and an idle spell
            elif line == "event: SandboxStarted":
                await bus.publish(ended)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    ids = [int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")]
    assert events == ["TaskRequested", "SandboxStarted", "TaskSucceeded"]  # and then it ended
    assert ids == sorted(ids)
    async with http.get(url, headers={**auth(token), "Last-Event-ID": str(ids[0])}) as r:
        rest = [line async for line in r.content if line.startswith(b"id: ")]
    assert [int(line[4:]) for line in rest] == ids[1:]


async def test_cancel_and_its_deprecated_alias(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    ids = []
    for prompt in ("c1", "c2"):
        async with http.post(
            f"{gateway.url}/v1/tasks", json={"prompt": prompt}, headers=auth(token)
        ) as r:
            ids.append((await r.json())["task_id"])
    async with http.post(f"{gateway.url}/v1/tasks/{ids[0]}/cancel", headers=auth(token)) as r:
        assert r.status == 202
        assert (await r.json())["task_id"] == ids[0]
        assert "Deprecation" not in r.headers
    async with http.delete(f"{gateway.url}/v1/tasks/{ids[1]}", headers=auth(token)) as r:
        assert r.status == 202
        assert r.headers["Deprecation"] == "true"
        assert r.headers["Link"] == f'</v1/tasks/{ids[1]}/cancel>; rel="successor-version"'
    for task_id in ids:
        types = [type(e).__name__ for _, e in await events_of(bus, task_id)]
        assert types == ["TaskRequested", "TaskCancelRequested"]
    ended = ev.TaskCancelled(event_id=ev.terminal_id(ids[0]), task_id=ids[0], tenant="acme")
    await bus.publish(ended)
    assert gateway.app is not None
    await gateway.app[PROJECTION].wait_terminal(ids[0], 10)
    async with http.post(f"{gateway.url}/v1/tasks/{ids[0]}/cancel", headers=auth(token)) as r:
        assert r.status == 409
        assert (await r.json())["error"]["code"] == "already_finished"


async def test_a_result_not_stored_yet_is_409_not_404(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "r"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=auth(token)) as r:
        assert r.status == 409
        error = (await r.json())["error"]
    assert error["code"] == "result_not_ready" and "queued" in error["message"]


async def test_405_says_which_methods_a_path_has(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.request("TRACE", f"{gateway.url}/v1/tasks") as r:
        assert r.status == 405
        assert set(r.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
        assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_what_the_schema_allows_is_accepted(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    body = {"prompt": "p", "timeout_s": 342.0, "max_turns": 1e1}
    async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(token)) as r:
        assert r.status == 202, await r.text()
        task_id = (await r.json())["task_id"]
    (_, event), *_ = await events_of(bus, task_id)
    assert isinstance(event, ev.TaskRequested)
    assert (event.spec.timeout_s, event.spec.max_turns) == (342, 10)
    async with http.get(f"{gateway.url}/v1/tasks?cursor=&limit=2.0", headers=auth(token)) as r:
        assert r.status == 200, await r.text()
        assert [t["task_id"] for t in (await r.json())["tasks"]] == [task_id]
    for query, field in (("cursor=x", "cursor"), ("limit=0", "limit"), ("limit=1.5", "limit")):
        async with http.get(f"{gateway.url}/v1/tasks?{query}", headers=auth(token)) as r:
            assert r.status == 400
            assert (await r.json())["error"]["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a\u0000b"}, "prompt"),
        ({"prompt": "p", "model": "claude\u0007"}, "model"),
        ({"prompt": "p", "allowed_tools": ["Bash", "Ed\u0000it"]}, "allowed_tools[1]"),
        ({"prompt": "p", "timeout_s": 1.5}, "timeout_s"),
    ],
)
async def test_what_cannot_reach_a_command_line_is_refused(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus, body: dict[str, Any], field: str
) -> None:
    token = gateway.token("acme")
    before = await bus.last_sequence()
    async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(token)) as r:
        assert r.status == 422
        assert (await r.json())["error"]["field"] == field
    assert await bus.last_sequence() == before


async def test_sse_resume_past_the_end(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "e"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    url = f"{gateway.url}/v1/tasks/{task_id}/events"
    far = {**auth(token), "Last-Event-ID": "999999999"}
    # A running task: the stream resumes from the end, so the terminal event still arrives.
    async with http.get(url, headers=far) as r:
        assert r.status == 200
        ended = ev.TaskSucceeded(event_id=ev.terminal_id(task_id), task_id=task_id, tenant="acme")
        await bus.publish(ended)
        body = await asyncio.wait_for(r.text(), 10)
    assert body.count("event: ") == 1 and "event: TaskSucceeded" in body
    # A finished task: nothing is left to send, and the stream ends at once.
    async with http.get(url, headers=far) as r:
        assert await asyncio.wait_for(r.text(), 10) == ""
    for bad in ("-1", "abc"):
        async with http.get(url, headers={**auth(token), "Last-Event-ID": bad}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_last_event_id"


async def test_a_malformed_tokens_line_locks_nobody_out(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    token = gateway.token("acme")
    with open(gateway.settings.tokens_path, "a") as out:
        out.write("{not json\n")
    later = gateway.token("globex")  # after the bad line: also read
    for t in (token, later):
        async with http.get(f"{gateway.url}/v1/tasks", headers=auth(t)) as r:
            assert r.status == 200


async def test_execute_authenticates_before_reading_the_body(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    before = await bus.last_sequence()
    async with http.post(
        f"{gateway.url}/execute",
        data=b"{" * 1000,
        headers={"Authorization": "Bearer nope", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 401  # not 400: the body was never parsed
        assert (await r.json())["error"]["code"] == "unauthorized"
    assert await bus.last_sequence() == before


async def test_a_store_failure_says_nothing_about_paths(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus, tmp_path: Path
) -> None:
    token = gateway.token("acme")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "s"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    stored = ev.ResultStored(
        event_id=ev.event_id(task_id, "ResultStored"),
        task_id=task_id,
        tenant="acme",
        status="succeeded",
        location="file:///results",
        objects=[],
    )
    await bus.publish(stored)
    await bus.publish(
        ev.TaskSucceeded(event_id=ev.terminal_id(task_id), task_id=task_id, tenant="acme")
    )
    # result.json is a folder: reading it fails with an OSError that names the path.
    (tmp_path / "results" / "tasks" / task_id / "result.json").mkdir(parents=True)
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result?", headers=auth(token)) as r:
        assert r.status == 503
        text = await r.text()
    assert str(tmp_path) not in text and "unavailable" in text


@pytest.fixture
async def limited(
    nats_server: NatsServer, stream_settings: StreamSettings, bus: Bus, tmp_path: Path
) -> AsyncIterator[Gateway]:
    limits = {"rate_per_tenant": 1.0, "max_queued_per_tenant": 3, "max_streams_per_tenant": 1}
    async with Gateway(nats_server, stream_settings, tmp_path, **limits) as gw:
        yield gw


async def test_a_tenant_over_its_rate_gets_429_and_others_do_not(
    limited: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    acme, globex = auth(limited.token("acme")), auth(limited.token("globex"))
    url = f"{limited.url}/v1/tasks"
    for prompt in ("a", "b"):  # the burst: twice the rate
        async with http.post(url, json={"prompt": prompt}, headers=acme) as r:
            assert r.status == 202
    before = await bus.last_sequence()
    async with http.post(url, json={"prompt": "c"}, headers=acme) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "rate_limited"
    assert await bus.last_sequence() == before  # nothing published for it
    async with http.post(url, json={"prompt": "d"}, headers=globex) as r:
        assert r.status == 202


async def test_a_tenants_rate_holds_across_gateway_processes(
    limited: Gateway,
    nats_server: NatsServer,
    stream_settings: StreamSettings,
    http: aiohttp.ClientSession,
    bus: Bus,
    tmp_path: Path,
) -> None:
    """Two gateway processes (replicas) on one event log: what one accepted counts on the
    other, as soon as the other's view of the tasks has it."""
    limits = {"rate_per_tenant": 1.0, "max_queued_per_tenant": 3, "max_streams_per_tenant": 1}
    (tmp_path / "other").mkdir()
    async with Gateway(nats_server, stream_settings, tmp_path / "other", **limits) as other:
        assert other.app is not None
        ids = []
        for prompt in ("a", "b"):  # the burst, on the first process
            async with http.post(
                f"{limited.url}/v1/tasks",
                json={"prompt": prompt},
                headers=auth(limited.token("acme")),
            ) as r:
                assert r.status == 202
                ids.append((await r.json())["task_id"])
        for task_id in ids:  # the other one's view has them
            assert await other.app[PROJECTION].wait_for_task(task_id, 10) is not None
        before = await bus.last_sequence()
        acme_there = auth(other.token("acme"))
        async with http.post(
            f"{other.url}/v1/tasks", json={"prompt": "c"}, headers=acme_there
        ) as r:
            assert r.status == 429
            assert (await r.json())["error"]["code"] == "rate_limited"
        assert await bus.last_sequence() == before
        async with http.post(
            f"{other.url}/v1/tasks", json={"prompt": "d"}, headers=auth(other.token("globex"))
        ) as r:
            assert r.status == 202  # another tenant is not held back


async def test_a_tenant_at_its_quota_gets_429_until_a_task_ends(
    limited: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    assert limited.app is not None
    projection, limits = limited.app[PROJECTION], limited.app[LIMITS]
    limits.rate = 1000.0  # only the quota is under test here
    limits.burst = 1000.0
    acme = auth(limited.token("acme"))
    url = f"{limited.url}/v1/tasks"
    ids = []
    for prompt in ("a", "b", "c"):
        async with http.post(url, json={"prompt": prompt}, headers=acme) as r:
            ids.append((await r.json())["task_id"])
    async with http.post(url, json={"prompt": "d"}, headers=acme) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "quota_exceeded"
        assert "Retry-After" in r.headers
    await bus.publish(
        ev.TaskSucceeded(event_id=ev.terminal_id(ids[0]), task_id=ids[0], tenant="acme")
    )
    await projection.wait_terminal(ids[0], 10)
    assert projection.open_by_tenant["acme"] == 2
    async with http.post(url, json={"prompt": "d"}, headers=acme) as r:
        assert r.status == 202


async def test_a_tenant_over_its_stream_cap_gets_429(
    limited: Gateway, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.05)  # a closed client is noticed at once
    assert limited.app is not None
    limits = limited.app[LIMITS]
    acme, globex = auth(limited.token("acme")), auth(limited.token("globex"))
    tasks = {}
    for name, headers in (("acme", acme), ("globex", globex)):
        async with http.post(f"{limited.url}/v1/tasks", json={"prompt": "s"}, headers=headers) as r:
            tasks[name] = (await r.json())["task_id"]

    def events(tenant: str) -> str:
        return f"{limited.url}/v1/tasks/{tasks[tenant]}/events"

    first = await http.get(events("acme"), headers=acme)  # open, following a live task
    assert first.status == 200
    async with http.get(events("acme"), headers=acme) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "too_many_streams"
    async with http.get(events("globex"), headers=globex) as r:
        assert r.status == 200  # another tenant's cap is its own
    first.close()
    async with asyncio.timeout(10):  # the server notices the closed stream and frees it
        while limits._streams.get("acme"):
            await asyncio.sleep(0.02)
    async with http.get(events("acme"), headers=acme) as r:
        assert r.status == 200


async def test_a_body_nested_too_deeply_is_a_400_not_a_crash(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    deep = b'{"prompt": "x", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    headers = {**auth(gateway.token("acme")), "Content-Type": "application/json"}
    before = await bus.last_sequence()
    async with http.post(f"{gateway.url}/v1/tasks", data=deep, headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "invalid_json"
    assert await bus.last_sequence() == before


async def test_artifacts_are_served_with_their_type_and_etag(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus, tmp_path: Path
) -> None:
    token, other = gateway.token("acme"), gateway.token("globex")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "a"}, headers=auth(token)) as r:
        task_id = (await r.json())["task_id"]
    base = f"{gateway.url}/v1/tasks/{task_id}/artifacts"
    async with http.get(f"{base}/diff.patch", headers=auth(token)) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "result_not_ready"

    store = await open_store(f"file://{tmp_path / 'results'}")
    objects = [
        await store.put(f"tasks/{task_id}/diff.patch", b"--- a\n+++ b\n", "text/x-diff"),
        await store.put(f"tasks/{task_id}/changes.bundle", b"# v2 git bundle\n", "x"),
    ]
    await store.close()
    await bus.publish(
        ev.ResultStored(
            event_id=ev.event_id(task_id, "ResultStored"),
            task_id=task_id,
            tenant="acme",
            status="succeeded",
            location="file:///results",
            objects=objects,
        )
    )
    await bus.publish(
        ev.TaskSucceeded(event_id=ev.terminal_id(task_id), task_id=task_id, tenant="acme")
    )
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}?wait=5", headers=auth(token)) as r:
        assert (await r.json())["status"] == "succeeded"

    async with http.get(f"{base}/diff.patch", headers=auth(token)) as r:
        assert r.status == 200 and await r.read() == b"--- a\n+++ b\n"
        assert r.headers["Content-Type"] == "text/x-diff; charset=utf-8"
        assert r.headers["ETag"] == f'"{objects[0].sha256}"'
    async with http.get(f"{base}/changes.bundle", headers=auth(token)) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/x-git-bundle"
    etag = {"If-None-Match": f'"{objects[1].sha256}"'}
    async with http.get(f"{base}/changes.bundle", headers={**auth(token), **etag}) as r:
        assert r.status == 304
    for name, code in [
        ("transcript.jsonl", "artifact_not_found"),
        ("..%2Fetc", "artifact_not_found"),
    ]:
        async with http.get(f"{base}/{name}", headers=auth(token)) as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == code, body
            assert body["error"]["field"] == "name"
    async with http.get(f"{base}/diff.patch", headers=auth(other)) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_files_are_stored_as_one_tar_and_the_task_names_it(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus, tmp_path: Path
) -> None:
    token = gateway.token("acme")
    big = os.urandom(3 << 20)  # over the 1 MiB of other bodies: files may be larger
    files = [
        {"path": "notes/todo.md", "content_b64": base64.b64encode(b"do it\n").decode()},
        {
            "path": "run.sh",
            "content_b64": base64.b64encode(b"#!/bin/sh\n").decode(),
            "mode": "0755",
        },
        {"path": "data.bin", "content_b64": base64.b64encode(big).decode()},
    ]
    body = {"prompt": "use the files", "files": files}
    async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(token)) as r:
        assert r.status == 202, await r.text()
        task_id = (await r.json())["task_id"]
    stored = await bus.last(task_id, "TaskRequested")
    assert stored is not None and isinstance(stored.event, ev.TaskRequested)
    ref = stored.event.spec.files
    assert ref is not None and ref.count == 3 and ref.key == f"inputs/{ref.sha256}.tar"
    archive = (tmp_path / "results" / ref.key).read_bytes()
    assert hashlib.sha256(archive).hexdigest() == ref.sha256 and len(archive) == ref.size
    assert inputs.unpack(archive) == [
        ("notes/todo.md", b"do it\n", 0o644),
        ("run.sh", b"#!/bin/sh\n", 0o755),
        ("data.bin", big, 0o644),
    ]
    # Other endpoints keep their 1 MiB.
    async with http.post(
        f"{gateway.url}/execute", json={"task": "x" * (2 << 20)}, headers=auth(token)
    ) as r:
        assert r.status == 413 and "1 MiB" in (await r.json())["error"]["message"]


async def test_a_follow_up_names_an_ended_task_of_the_same_tenant(
    gateway: Gateway, http: aiohttp.ClientSession, bus: Bus
) -> None:
    token, other = gateway.token("acme"), gateway.token("globex")
    async with http.post(f"{gateway.url}/v1/tasks", json={"prompt": "a"}, headers=auth(token)) as r:
        earlier = (await r.json())["task_id"]
    unknown = ev.new_task_id()
    cases = [
        (token, {"prompt": "b", "follow_up": unknown}, "follow_up", f"no task of yours: {unknown}"),
        (other, {"prompt": "b", "follow_up": earlier}, "follow_up", "no task of yours"),
        (token, {"prompt": "b", "follow_up": earlier}, "follow_up", "has not ended (status "),
        (token, {"prompt": "b", "follow_up": "t_1"}, "follow_up", "matching regex"),
        (token, {"prompt": "b", "follow_up": earlier, "repo": {"url": "https://h/a"}}, "repo",
         "follow-up"),
    ]  # fmt: skip
    for who, body, field, says in cases:
        async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(who)) as r:
            answer = await r.json()
            assert r.status == 422 and answer["error"]["code"] == "invalid_field", (body, answer)
            assert answer["error"]["field"] == field and says in answer["error"]["message"]
    # Another tenant's task reads exactly like one that does not exist.
    for who, task in ((other, earlier), (token, unknown)):
        body = {"prompt": "b", "follow_up": task}
        async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(who)) as r:
            message = (await r.json())["error"]["message"]
        assert message == f"follow_up names no task of yours: {task}"
    await bus.publish(
        ev.TaskSucceeded(event_id=ev.terminal_id(earlier), task_id=earlier, tenant="acme")
    )
    async with http.get(f"{gateway.url}/v1/tasks/{earlier}?wait=5", headers=auth(token)) as r:
        assert (await r.json())["status"] == "succeeded"
    body = {"prompt": "b", "follow_up": earlier}
    async with http.post(f"{gateway.url}/v1/tasks", json=body, headers=auth(token)) as r:
        assert r.status == 202
        task_id = (await r.json())["task_id"]
    stored = await bus.last(task_id, "TaskRequested")
    assert stored is not None and isinstance(stored.event, ev.TaskRequested)
    assert stored.event.spec.follow_up == earlier
