"""The model proxy over real Unix sockets, in front of the scripted fake Messages API; and the
contract the executor relies on, run against the proxy in process and over its control socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog
from aiohttp import web

from services.modelproxy.control import ModelSockets, ProxyClient, serve_control
from services.modelproxy.policy import Budget, Prices, ProxyPolicy
from services.modelproxy.proxy import OAUTH_BETA, Credential, ModelProxy
from shared import events as ev
from shared.errors import Unavailable
from shared.sandbox import SANDBOX_UID
from tests.fakes.model import FakeModel, Reply, Text, ToolUse
from tests.support.procs import free_port

SECRET = "sk-ant-proxy-" + uuid.uuid4().hex


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ss-proxy-", dir="/tmp"))
    # Traversable, as a bind mount makes a task's folder for its sandbox; each task's folder
    # and socket are what keep other users out.
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeModel]:
    async with FakeModel() as f:
        yield f


@pytest_asyncio.fixture
async def proxy(fake: FakeModel, socket_dir: Path) -> AsyncIterator[ModelProxy]:
    async with ModelProxy(
        socket_dir=socket_dir, upstream=fake.url, credential=Credential("api_key", SECRET)
    ) as p:
        yield p


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 1000,
        "tools": [{"name": "Write", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        **extra,
    }


def client(path: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))


SANDBOX_HEADERS = {
    "x-api-key": "sandstream-placeholder",
    "authorization": "Bearer from-the-sandbox",
    "anthropic-version": "2023-06-01",
    "x-claude-code-session-id": "sess-1",
}


def connects_as(uid: int, path: Path) -> bool:
    """Whether a process running as ``uid`` can connect to the Unix socket ``path``."""
    pid = os.fork()
    if pid == 0:  # the child: become ``uid``, try, report by exit status, never return
        code = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


async def test_socket_is_per_task_and_reachable_by_the_sandbox_user_only(
    proxy: ModelProxy, socket_dir: Path
) -> None:
    path = await proxy.add_task("t_one")
    assert path == socket_dir / "t_one" / "model.sock"
    assert stat.S_ISSOCK(path.stat().st_mode)
    if os.getuid() == 0:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert connects_as(SANDBOX_UID, path)  # the agent's user, as in the sandbox
        assert not connects_as(SANDBOX_UID + 1, path)  # any other local user
    else:  # as uid 1000 the same modes; any other user: the documented, warned fallback
        private = os.getuid() == SANDBOX_UID
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if private else 0o666)
    assert await proxy.add_task("t_one") == path  # idempotent
    with pytest.raises(ValueError):
        await proxy.add_task("../escape")
    await proxy.remove_task("t_one")
    assert not path.exists()
    async with client(path) as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post("http://sandbox/v1/messages", json=body("x"))


async def test_key_is_replaced_and_query_kept(proxy: ModelProxy, fake: FakeModel) -> None:
    fake.script(replies=[Text("hello")])
    path = await proxy.add_task("t_key")
    async with client(path) as http:
        resp = await http.post(
            "http://sandbox/v1/messages?beta=true", json=body("hi"), headers=SANDBOX_HEADERS
        )
        assert resp.status == 200
        answer = await resp.json()
    assert answer["content"] == [{"type": "text", "text": "hello"}]
    (rec,) = fake.requests
    assert rec.path == "/v1/messages" and rec.query == {"beta": "true"}
    assert rec.api_key == SECRET
    assert rec.authorization is None
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["x-claude-code-session-id"] == "sess-1"
    assert SECRET not in json.dumps(answer)


async def test_oauth_token_goes_as_bearer(fake: FakeModel, socket_dir: Path) -> None:
    fake.script(replies=[Text("hello")])
    async with ModelProxy(
        socket_dir=socket_dir, upstream=fake.url, credential=Credential("oauth", SECRET)
    ) as proxy:
        path = await proxy.add_task("t_oauth")
        async with client(path) as http:
            headers = {**SANDBOX_HEADERS, "anthropic-beta": "some-beta"}
            resp = await http.post("http://sandbox/v1/messages", json=body("x"), headers=headers)
            assert resp.status == 200
    (rec,) = fake.requests
    assert rec.authorization == f"Bearer {SECRET}"
    assert rec.api_key is None
    assert rec.headers["anthropic-beta"].split(",") == ["some-beta", OAUTH_BETA]


async def test_only_the_messages_api_is_forwarded(proxy: ModelProxy, fake: FakeModel) -> None:
    path = await proxy.add_task("t_paths")
    async with client(path) as http:
        cases = [
            ("GET", "/v1/models", 403),
            ("POST", "/v1/complete", 403),
            ("POST", "/v1/messages/batches", 403),
            ("GET", "/api/hello", 404),
            ("POST", "/", 404),
            ("GET", "/v1/messages", 405),
        ]
        for method, url, status in cases:
            resp = await http.request(method, f"http://sandbox{url}", headers=SANDBOX_HEADERS)
            assert resp.status == status, (method, url)
            err = await resp.json()
            assert err["type"] == "error" and err["error"]["message"], err
        count = await http.post(
            "http://sandbox/v1/messages/count_tokens", json=body("x"), headers=SANDBOX_HEADERS
        )
        assert count.status == 200 and (await count.json())["input_tokens"] > 0
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/v1/messages/count_tokens")]
    usage = await proxy.usage("t_paths")
    assert usage.requests == 1 and usage.input_tokens == 0  # counting is not consuming


async def test_streaming_passes_through_as_it_arrives(proxy: ModelProxy, fake: FakeModel) -> None:
    release = asyncio.Event()
    fake.script(replies=[Reply(Text("streamed"), hold=release, input_tokens=123, output_tokens=45)])
    path = await proxy.add_task("t_stream")
    async with client(path) as http:
        resp = await http.post(
            "http://sandbox/v1/messages", json=body("s", stream=True), headers=SANDBOX_HEADERS
        )
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        # message_start comes through while the model still "thinks": nothing is buffered.
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert b"message_start" in first
        assert not release.is_set()
        release.set()
        rest = (await resp.content.read()).decode()
    assert "streamed" in rest and "message_stop" in rest
    usage = await proxy.usage("t_stream")
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 123, 45)


async def test_tokens_are_counted_per_task(proxy: ModelProxy, fake: FakeModel) -> None:
    fake.script(
        match="alpha",
        replies=[
            Reply(ToolUse.bash("ls"), input_tokens=10, output_tokens=3),
            Reply(Text("a"), input_tokens=20, output_tokens=4),
        ],
    )
    fake.script(match="beta", replies=[Reply(Text("b"), input_tokens=7, output_tokens=1)])
    a, b = await proxy.add_task("t_a"), await proxy.add_task("t_b")
    async with client(a) as http_a, client(b) as http_b:
        first = await (
            await http_a.post(
                "http://s/v1/messages",
                json=body("alpha"),
                headers={"x-claude-code-session-id": "A"},
            )
        ).json()
        second_body = body("alpha", stream=True)
        second_body["messages"] += [
            {"role": "assistant", "content": first["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
        ]
        resp = await http_a.post(
            "http://s/v1/messages", json=second_body, headers={"x-claude-code-session-id": "A"}
        )
        await resp.read()
        resp = await http_b.post(
            "http://s/v1/messages",
            json=body("beta", stream=True),
            headers={"x-claude-code-session-id": "B"},
        )
        await resp.read()
    ua, ub = await proxy.usage("t_a"), await proxy.usage("t_b")
    assert (ua.requests, ua.input_tokens, ua.output_tokens) == (2, 30, 7)
    assert (ub.requests, ub.input_tokens, ub.output_tokens) == (1, 7, 1)
    assert ua.as_dict()["cache_read_input_tokens"] == 0


async def test_upstream_errors_pass_through_and_unreachable_is_502(
    fake: FakeModel, socket_dir: Path
) -> None:
    fake.fail_next(1, status=529)
    async with ModelProxy(
        socket_dir=socket_dir, upstream=fake.url, credential=Credential("api_key", SECRET)
    ) as proxy:
        path = await proxy.add_task("t_err")
        async with client(path) as http:
            resp = await http.post("http://s/v1/messages", json=body("x"))
            assert resp.status == 529
            assert "retry-after-ms" in resp.headers
            assert (await resp.json())["error"]["type"] == "overloaded_error"
        assert (await proxy.usage("t_err")).upstream_errors == 1

    dead = f"http://127.0.0.1:{free_port()}"
    with structlog.testing.capture_logs() as logs:
        async with ModelProxy(
            socket_dir=socket_dir, upstream=dead, credential=Credential("api_key", SECRET)
        ) as proxy:
            path = await proxy.add_task("t_dead")
            async with client(path) as http:
                resp = await http.post("http://s/v1/messages", json=body("x"))
                assert resp.status == 502
                assert resp.headers["x-should-retry"] == "true"
                text = await resp.text()
    assert SECRET not in text
    assert logs and SECRET not in json.dumps(logs, default=str)


async def test_without_credential_nothing_is_forwarded(fake: FakeModel, socket_dir: Path) -> None:
    async with ModelProxy(socket_dir=socket_dir, upstream=fake.url, credential=None) as proxy:
        path = await proxy.add_task("t_none")
        async with client(path) as http:
            resp = await http.post("http://s/v1/messages", json=body("x"), headers=SANDBOX_HEADERS)
            assert resp.status == 401
            assert "ANTHROPIC_API_KEY" in (await resp.json())["error"]["message"]
    assert fake.requests == []


async def test_a_new_proxy_adopts_sockets_and_continues_the_count(
    fake: FakeModel, socket_dir: Path
) -> None:
    fake.script(replies=[Reply(Text("x"), input_tokens=5, output_tokens=2)])
    credential = Credential("api_key", SECRET)
    async with ModelProxy(socket_dir=socket_dir, upstream=fake.url, credential=credential) as p1:
        path = await p1.add_task("t_keep")
        async with client(path) as http:
            await (await http.post("http://s/v1/messages", json=body("x"))).read()
    assert path.exists()  # closing the proxy leaves the socket for the next one

    async with ModelProxy(socket_dir=socket_dir, upstream=fake.url, credential=credential) as p2:
        assert await p2.adopt_existing() == ["t_keep"]
        async with client(path) as http:
            await (await http.post("http://s/v1/messages", json=body("x"))).read()
        usage = await p2.usage("t_keep")
        assert (usage.requests, usage.input_tokens, usage.output_tokens) == (2, 10, 4)
        await p2.remove_task("t_keep")
    assert os.listdir(socket_dir / "t_keep") == []


def test_credential_never_shows_its_value() -> None:
    cred = Credential.from_env({"ANTHROPIC_API_KEY": SECRET, "CLAUDE_CODE_OAUTH_TOKEN": "o"})
    assert cred is not None and cred.kind == "api_key"
    assert SECRET not in repr(cred) and SECRET not in str(cred) and SECRET not in f"{cred}"
    oauth = Credential.from_env({"CLAUDE_CODE_OAUTH_TOKEN": "tok"})
    assert oauth is not None and oauth.kind == "oauth"
    assert Credential.from_env({"ANTHROPIC_API_KEY": "  "}) is None


# ---- the executor's contract: in process and over the control socket ------------------------


@pytest_asyncio.fixture(params=["in-process", "control-socket"])
async def sockets(
    request: pytest.FixtureRequest, proxy: ModelProxy, socket_dir: Path
) -> AsyncIterator[ModelSockets]:
    if request.param == "in-process":
        yield proxy
        return
    path = socket_dir / "control.sock"
    runner = await serve_control(proxy, path)
    client = ProxyClient(path)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


async def test_contract_open_count_close(
    sockets: ModelSockets, fake: FakeModel, socket_dir: Path
) -> None:
    task_id = ev.new_task_id()
    assert await sockets.credential_kind() == "api_key"
    assert (await sockets.usage(task_id)).requests == 0
    await sockets.add_task(task_id)
    await sockets.add_task(task_id)  # idempotent
    path = socket_dir / task_id / "model.sock"
    fake.script([Text("counted")], match="count me")
    async with (
        client(path) as http,
        http.post(
            "http://sandbox/v1/messages", json=body("count me"), headers=SANDBOX_HEADERS
        ) as r,
    ):
        assert r.status == 200
    usage = await sockets.usage(task_id)
    assert usage.requests == 1 and usage.output_tokens > 0
    await sockets.remove_task(task_id)
    assert not path.exists()
    assert (await sockets.usage(task_id)).requests == 0


async def test_control_socket_is_private_and_checks_task_ids(
    proxy: ModelProxy, socket_dir: Path
) -> None:
    path = socket_dir / "control.sock"
    runner = await serve_control(proxy, path)
    client = ProxyClient(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        if os.getuid() == 0:
            assert not connects_as(SANDBOX_UID, path)  # not even the agents' uid
        for bad in ("..", "t_short", "t_" + "A" * 20):
            with pytest.raises(RuntimeError, match="refused"):
                await client.add_task(bad)
        assert list(socket_dir.iterdir()) == [path]  # nothing was created for them
    finally:
        await client.close()
        await runner.cleanup()
    gone = ProxyClient(path, wait_s=0.5)
    try:
        with pytest.raises(Unavailable, match="does not answer"):
            await gone.credential_kind()
    finally:
        await gone.close()


# ---- what the proxy lets through -----------------------------------------------------------


@pytest_asyncio.fixture
async def strict(fake: FakeModel, socket_dir: Path) -> AsyncIterator[ModelProxy]:
    policy = ProxyPolicy(
        max_body_bytes=64 * 1024,
        max_connections=3,
        body_timeout_s=0.5,
        prices=json.dumps({"claude-test*": [3, 15, 3.75, 0.3]}),
    )
    async with ModelProxy(
        socket_dir=socket_dir,
        upstream=fake.url,
        credential=Credential("api_key", SECRET),
        policy=policy,
    ) as p:
        yield p


async def post(path: Path, payload: Any) -> tuple[int, dict[str, Any]]:
    async with client(path) as http, http.post("http://s/v1/messages", json=payload) as r:
        return r.status, await r.json()


async def test_a_body_over_the_cap_is_413_and_never_forwarded(
    strict: ModelProxy, fake: FakeModel
) -> None:
    path = await strict.add_task("t_big")
    status, answer = await post(path, body("x" * 70_000))
    assert status == 413 and answer["error"]["type"] == "request_too_large"
    assert fake.requests == []
    assert (await strict.usage("t_big")).refused == 1


async def test_only_messages_fields_and_plain_tools_are_forwarded(
    strict: ModelProxy, fake: FakeModel, socket_dir: Path
) -> None:
    fake.script([Text("screened")], match="screen me")
    path = await strict.add_task("t_fields")
    tools = [
        {"name": "Write", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "Mine", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "code_execution_20250522", "name": "code_execution"},
    ]
    payload = body(
        "screen me",
        tools=tools,
        mcp_servers=[{"type": "url", "url": "https://example.invalid/mcp", "name": "x"}],
        container="c_1",
        surprise={"a": 1},
    )
    status, _ = await post(path, payload)
    assert status == 200
    (rec,) = fake.requests
    assert set(rec.body) == {"model", "max_tokens", "tools", "messages"}
    assert [t["name"] for t in rec.body["tools"]] == ["Write", "Mine"]
    # An operator may allow server-side tools; unknown fields still go.
    async with ModelProxy(
        socket_dir=socket_dir,
        upstream=fake.url,
        credential=Credential("api_key", SECRET),
        policy=ProxyPolicy(allow_server_tools=True),
    ) as lenient:
        fake.script([Text("allowed")], match="screen me")
        status, _ = await post(await lenient.add_task("t_server"), payload)
    assert status == 200
    assert {"mcp_servers", "container"} <= set(fake.requests[-1].body) and len(
        fake.requests[-1].body["tools"]
    ) == 4
    assert "surprise" not in fake.requests[-1].body


async def test_a_model_not_allowed_is_refused(fake: FakeModel, socket_dir: Path) -> None:
    async with ModelProxy(
        socket_dir=socket_dir,
        upstream=fake.url,
        credential=Credential("api_key", SECRET),
        policy=ProxyPolicy(allowed_models=("claude-sonnet-*",)),
    ) as proxy:
        path = await proxy.add_task("t_model")
        status, answer = await post(path, body("x"))  # model claude-test
        assert status == 400 and "'claude-test' is not allowed" in answer["error"]["message"]
        status, answer = await post(path, {"messages": []})
        assert status == 400 and "names no model" in answer["error"]["message"]
    assert fake.requests == []


async def test_redirects_are_not_followed(socket_dir: Path) -> None:
    """An upstream answering 307 elsewhere: the proxy hands the 307 back and never sends the
    request, or the credential, to the other place."""
    hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.headers.get("x-api-key", ""))
        return web.json_response({})

    other = web.Application()
    other.router.add_post("/v1/messages", elsewhere)
    other_port = free_port()
    redirecting = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}/v1/messages")

    redirecting.router.add_post("/v1/messages", redirect)
    runners = []
    port = free_port()
    for app, at in ((other, other_port), (redirecting, port)):
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", at).start()
        runners.append(runner)
    try:
        async with ModelProxy(
            socket_dir=socket_dir,
            upstream=f"http://127.0.0.1:{port}",
            credential=Credential("api_key", SECRET),
        ) as proxy:
            path = await proxy.add_task("t_redirect")
            async with (
                client(path) as http,
                http.post("http://s/v1/messages", json=body("x"), allow_redirects=False) as r,
            ):
                assert r.status == 307
    finally:
        for runner in runners:
            await runner.cleanup()
    assert hits == []


async def first_line(path: Path) -> bytes:
    """The status line a new connection gets to a small request (``b""``: closed unanswered)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b"GET /nothing HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.readline(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_connections_past_the_cap_are_closed(strict: ModelProxy) -> None:
    path = await strict.add_task("t_conns")
    held = []
    for _ in range(3):  # up to the cap, each connection is served (and keeps its slot)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /nothing HTTP/1.1\r\nHost: s\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 404")
        held.append(writer)
    assert await first_line(path) == b""
    held.pop().close()  # a slot frees up once a held connection is gone
    async with asyncio.timeout(10):
        while not (line := await first_line(path)):
            await asyncio.sleep(0.01)
    assert line.startswith(b"HTTP/1.1 404")
    for writer in held:
        writer.close()


async def test_a_body_that_never_arrives_is_refused(strict: ModelProxy) -> None:
    path = await strict.add_task("t_slow")
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n{")
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 400")


async def test_the_budget_refuses_the_call_past_the_cap_and_survives_a_restart(
    strict: ModelProxy, fake: FakeModel, socket_dir: Path
) -> None:
    fake.script(
        match="spend",
        replies=[
            Reply(ToolUse.bash("ls"), input_tokens=1000, output_tokens=200),
            Reply(Text("never"), input_tokens=1000, output_tokens=200),
        ],
    )
    path = await strict.add_task("t_budget", Budget(max_tokens=1000))
    status, _ = await post(path, body("spend"))
    assert status == 200
    usage = await strict.usage("t_budget")
    assert usage.tokens == 1200 and usage.budget_exceeded == ""
    # priced by the table: 1000 in at $3, 200 out at $15 per million tokens
    assert usage.cost_usd == pytest.approx(0.006)
    status, answer = await post(path, body("spend"))
    assert status == 400 and "budget exceeded" in answer["error"]["message"]
    assert len(fake.requests) == 1
    assert "max_tokens is 1000" in (await strict.usage("t_budget")).budget_exceeded
    # A restarted proxy (no budget passed again) still enforces it, by cost this time.
    await strict.close()
    async with ModelProxy(
        socket_dir=socket_dir, upstream=fake.url, credential=Credential("api_key", SECRET)
    ) as again:
        assert "t_budget" in await again.adopt_existing()
        status, _ = await post(path, body("spend"))
        assert status == 400
        await again.add_task("t_cost", Budget(max_budget_usd=0.001))
        fake.script(match="costly", replies=[Reply(Text("ok"), input_tokens=100_000)])
        status, _ = await post(again.socket_path("t_cost"), body("costly"))
        assert status == 200
        status, answer = await post(again.socket_path("t_cost"), body("costly"))
        assert status == 400 and "max_budget_usd" in answer["error"]["message"]


def test_prices_parse_and_price_the_unknown_as_the_dearest() -> None:
    prices = Prices.parse("")
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    assert prices.cost("claude-sonnet-4-5-20250929", usage) == pytest.approx(18.0)
    assert prices.cost("some-other-model", usage) == pytest.approx(90.0)
    for bad in ("[1]", "{", '{"x": [1, 2]}', '{"x": [1, 2, 3, -1]}', "{}"):
        with pytest.raises(ValueError):
            Prices.parse(bad)
