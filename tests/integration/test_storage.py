"""The storage service against a real nats-server and real stores (file:// and moto's S3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.storage.__main__ import serve
from services.storage.build import build, build_result, build_transcript
from services.storage.service import StorageService
from shared import events as ev
from shared.blobstore import BlobStore, open_store
from shared.bus import Bus
from shared.errors import Unavailable
from shared.results import (
    TaskResult,
    decode_result,
    diff_key,
    result_key,
    result_schema,
    transcript_key,
)
from shared.settings import Settings
from tests.support.procs import NatsServer
from tests.support.s3 import DUMMY_ENV, MotoS3, fake_aws_env, unique_bucket

REPO = Path(__file__).resolve().parents[2]
TENANT = "acme"
DIFF = (
    "diff --git a/hello.txt b/hello.txt\nnew file mode 100644\n--- /dev/null\n"
    "+++ b/hello.txt\n@@ -0,0 +1 @@\n+hello\n"
)
LINES = [
    '{"type":"system","subtype":"init","session_id":"s-1","model":"claude-test"}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":"Writing the file."}]}}',
    '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Write"}]}}',
    '{"type":"user","message":{"content":[{"type":"tool_result","content":"ok"}]}}',
    '{"type":"result","subtype":"success","is_error":false,"result":"Done.","num_turns":2}',
]


def envelope(task: str, name: str, attempt: int | str = 1) -> dict[str, Any]:
    return {"event_id": ev.event_id(task, name, attempt), "task_id": task, "tenant": TENANT}


def requested(task: str) -> ev.TaskRequested:
    return ev.TaskRequested(**envelope(task, "TaskRequested"), spec=ev.TaskSpec(prompt="hi"))


def sandbox_started(task: str) -> ev.SandboxStarted:
    return ev.SandboxStarted(
        **envelope(task, "SandboxStarted"), sandbox=f"sandstream-{task}", image="img:1"
    )


def execution_started(task: str) -> ev.ExecutionStarted:
    return ev.ExecutionStarted(**envelope(task, "ExecutionStarted"), sandbox=f"sandstream-{task}")


def output(task: str, first: int, lines: list[str], batch: int) -> ev.AgentOutput:
    return ev.AgentOutput(**envelope(task, "AgentOutput", first), batch=batch, lines=lines)


MODEL_USAGE = ev.ModelUsage(requests=3, input_tokens=150, output_tokens=50, cost_usd=0.0012)


def completed(task: str, **overrides: Any) -> ev.ExecutionCompleted:
    fields: dict[str, Any] = {
        "text": "Done.",
        "is_error": False,
        "exit_code": 0,
        "num_turns": 2,
        "total_cost_usd": 0.0123,
        "usage": {"input_tokens": 120, "output_tokens": 45},
        "session_id": "s-1",
        "permission_denials": [{"tool_name": "Bash", "tool_input": {"command": "ls"}}],
        "duration_ms": 812,
        "diff": DIFF,
        "files_changed": ["hello.txt"],
        "model_usage": MODEL_USAGE,
    }
    fields.update(overrides)
    return ev.ExecutionCompleted(**envelope(task, "ExecutionEnded"), **fields)


def failed(task: str) -> ev.ExecutionFailed:
    return ev.ExecutionFailed(
        **envelope(task, "ExecutionEnded"),
        code="cli_error",
        message="claude exited with code 1: API error",
        exit_code=1,
        text="API error",
        duration_ms=90,
    )


def stopped(task: str, reason: str = "completed", **usage: Any) -> ev.SandboxStopped:
    values: dict[str, Any] = {
        "image": "img:1",
        "cpu_seconds": 1.25,
        "memory_peak_bytes": 123_456_789,
        "wall_ms": 2_345,
    }
    values.update(usage)
    return ev.SandboxStopped(
        **envelope(task, "SandboxStopped"),
        sandbox=f"sandstream-{task}",
        reason=reason,
        usage=ev.Usage(**values),
    )


def succeeded_history(task: str) -> list[ev.Event]:
    return [
        requested(task),
        sandbox_started(task),
        execution_started(task),
        output(task, 0, LINES[:3], batch=0),
        output(task, 3, LINES[3:], batch=1),
        completed(task),
        stopped(task),
    ]


async def publish_all(bus: Bus, events: list[ev.Event]) -> None:
    for event in events:
        await bus.publish(event)


async def history(bus: Bus, task: str) -> list[ev.AnyEvent]:
    return [r.event async for r in bus.read(bus.task_filter(task))]


async def results_stored(bus: Bus, task: str) -> list[ev.ResultStored]:
    return [e for e in await history(bus, task) if isinstance(e, ev.ResultStored)]


async def wait_for(bus: Bus, task: str, kind: type[ev.Event], timeout: float = 20) -> ev.AnyEvent:
    """The first event of ``kind`` for ``task``, waiting live for it (no sleeps)."""
    async with asyncio.timeout(timeout):
        async for record in bus.read(bus.task_filter(task), follow=True):
            if isinstance(record.event, kind):
                return record.event
    raise AssertionError("unreachable")


# ---- backends --------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    store: BlobStore
    endpoint_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
async def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    moto: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Backend]:
    fake_aws_env(monkeypatch)
    if request.param == "file":
        store = await open_store(f"file://{tmp_path}/results")
        yield Backend("file", store)
    else:
        bucket = await moto.create_bucket()
        store = await open_store(f"s3://{bucket}/sandstream", endpoint_url=moto.endpoint_url)
        yield Backend("s3", store, endpoint_url=moto.endpoint_url)
    await store.close()


def service_for(bus: Bus, store: BlobStore, **kwargs: Any) -> StorageService:
    kwargs.setdefault("backoff", lambda n: 0.05)
    return StorageService(bus=bus, store=store, **kwargs)


async def check_stored_objects(backend: Backend, stored: ev.ResultStored) -> dict[str, bytes]:
    """Read every object through a store opened at ``location``; sizes and sha256 must match."""
    folder = await open_store(stored.location, endpoint_url=backend.endpoint_url)
    contents: dict[str, bytes] = {}
    try:
        for obj in stored.objects:
            data = await folder.get(obj.key.rsplit("/", 1)[-1])
            assert data is not None, obj.key
            assert len(data) == obj.size
            assert hashlib.sha256(data).hexdigest() == obj.sha256
            contents[obj.key] = data
    finally:
        await folder.close()
    return contents


# ---- the service -----------------------------------------------------------------------


async def test_stores_a_succeeded_task(bus: Bus, backend: Backend) -> None:
    task = ev.new_task_id()
    await publish_all(bus, succeeded_history(task))
    await service_for(bus, backend.store).run_until_idle()

    [stored] = await results_stored(bus, task)
    assert stored.event_id == f"{task}:ResultStored:1"
    assert stored.causation_id == f"{task}:SandboxStopped:1"
    assert stored.tenant == TENANT
    assert stored.status == "succeeded"
    assert stored.location == backend.store.url_for(f"tasks/{task}/")
    assert stored.location.endswith(f"/tasks/{task}/")
    keys = [o.key for o in stored.objects]
    assert sorted(keys) == sorted([result_key(task), transcript_key(task), diff_key(task)])

    contents = await check_stored_objects(backend, stored)
    result = decode_result(contents[result_key(task)])
    assert result == TaskResult(
        task_id=task,
        status="succeeded",
        text="Done.",
        is_error=False,
        exit_code=0,
        num_turns=2,
        total_cost_usd=0.0123,
        usage={"input_tokens": 120, "output_tokens": 45},
        session_id="s-1",
        permission_denials=[{"tool_name": "Bash", "tool_input": {"command": "ls"}}],
        duration_ms=812,
        diff=DIFF,
        files_changed=["hello.txt"],
        sandbox=result.sandbox,
        model_usage=MODEL_USAGE,
        error=None,
    )
    raw = msgspec.json.decode(contents[result_key(task)])
    assert raw["sandbox"] == {
        "image": "img:1",
        "cpu_seconds": 1.25,
        "memory_peak_bytes": 123_456_789,
        "wall_ms": 2_345,
    }
    assert raw["error"] is None
    assert set(raw) >= set(result_schema()["$defs"]["TaskResult"]["required"])
    assert contents[transcript_key(task)].decode().splitlines() == LINES
    assert contents[diff_key(task)].decode() == DIFF


async def test_redelivery_emits_no_second_result_stored(bus: Bus, backend: Backend) -> None:
    task = ev.new_task_id()
    events = succeeded_history(task)
    await publish_all(bus, events)
    service = service_for(bus, backend.store)
    await service.run_until_idle()
    [first] = await results_stored(bus, task)

    # The same SandboxStopped again, past the duplicate window (another Nats-Msg-Id) ...
    again = events[-1]
    assert isinstance(again, ev.SandboxStopped)
    await bus.publish(again, msg_id=f"{again.event_id}:redelivered")
    await service.run_until_idle()
    # ... and the handler run directly on it, as a redelivery after a crash would.
    assert await service.store_result(again) is None

    assert await results_stored(bus, task) == [first]
    await check_stored_objects(backend, first)  # still exactly what the event says


async def test_a_failed_task_is_stored_as_failed_with_its_error(bus: Bus, backend: Backend) -> None:
    task = ev.new_task_id()
    await publish_all(
        bus,
        [
            requested(task),
            sandbox_started(task),
            execution_started(task),
            output(task, 0, LINES[:1], batch=0),
            failed(task),
            stopped(task, reason="failed"),
        ],
    )
    await service_for(bus, backend.store).run_until_idle()
    [stored] = await results_stored(bus, task)
    assert stored.status == "failed"
    contents = await check_stored_objects(backend, stored)
    result = decode_result(contents[result_key(task)])
    assert result.status == "failed"
    assert result.is_error and result.exit_code == 1 and result.text == "API error"
    assert result.error == ev.ErrorInfo(
        code="cli_error", message="claude exited with code 1: API error"
    )
    assert stored.error == result.error  # one decision: the lifecycle copies this one
    assert contents[transcript_key(task)].decode().splitlines() == LINES[:1]
    assert contents[diff_key(task)] == b""


async def test_a_timed_out_task_is_stored_as_timed_out(bus: Bus, backend: Backend) -> None:
    task = ev.new_task_id()
    timed_out = ev.TaskTimedOut(
        event_id=ev.terminal_id(task), task_id=task, tenant=TENANT, timeout_s=30
    )
    await publish_all(
        bus,
        [
            requested(task),
            sandbox_started(task),
            execution_started(task),
            output(task, 0, LINES[:2], batch=0),
            timed_out,
            stopped(task, reason="timeout", wall_ms=30_000),
        ],
    )
    await service_for(bus, backend.store).run_until_idle()
    [stored] = await results_stored(bus, task)
    assert stored.status == "timed_out"
    contents = await check_stored_objects(backend, stored)
    result = decode_result(contents[result_key(task)])
    assert result.status == "timed_out" and result.is_error and result.exit_code is None
    assert result.error is not None and result.error.code == "timeout"
    assert "30 seconds" in result.error.message
    assert result.sandbox.wall_ms == 30_000
    assert contents[transcript_key(task)].decode().splitlines() == LINES[:2]


async def test_a_task_cancelled_before_its_sandbox_is_stored(bus: Bus, backend: Backend) -> None:
    task = ev.new_task_id()
    cancelled = ev.TaskCancelled(
        event_id=ev.terminal_id(task), task_id=task, tenant=TENANT, reason="requested"
    )
    never = ev.SandboxStopped(
        **envelope(task, "SandboxStopped"), sandbox="", reason="cancelled", usage=ev.Usage()
    )
    await publish_all(bus, [requested(task), cancelled, never])
    await service_for(bus, backend.store).run_until_idle()
    [stored] = await results_stored(bus, task)
    assert stored.status == "cancelled"
    contents = await check_stored_objects(backend, stored)
    result = decode_result(contents[result_key(task)])
    assert result.error == ev.ErrorInfo(code="cancelled", message="requested")
    assert result.sandbox.cpu_seconds == 0 and contents[transcript_key(task)] == b""


async def test_many_tasks_at_once(bus: Bus, backend: Backend) -> None:
    tasks = [ev.new_task_id() for _ in range(12)]
    for task in tasks:
        await publish_all(bus, succeeded_history(task))
    await service_for(bus, backend.store, concurrency=4).run_until_idle()
    for task in tasks:
        [stored] = await results_stored(bus, task)
        assert stored.status == "succeeded"


async def test_an_incomplete_history_read_is_read_again(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Bus.read`` can come back early and empty; the result must never be built from that."""
    task = ev.new_task_id()
    events = succeeded_history(task)
    await publish_all(bus, events)
    real_read = bus.read
    calls = 0

    def flaky_read(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return _nothing()
        return real_read(*args, **kwargs)

    monkeypatch.setattr(bus, "read", flaky_read)
    service = service_for(bus, await open_store(f"file://{tmp_path}"))
    stopped_event = events[-1]
    assert isinstance(stopped_event, ev.SandboxStopped)
    stored = await service.store_result(stopped_event)
    assert stored is not None and stored.status == "succeeded" and calls == 2


async def _nothing() -> AsyncIterator[Any]:
    return
    yield


# ---- a store that refuses writes for a while -------------------------------------------


class Watched:
    """A real store with a counter: ``refused`` is set after ``n`` refused writes."""

    def __init__(self, inner: BlobStore, n: int = 2) -> None:
        self.inner = inner
        self.n = n
        self.failures = 0
        self.refused = asyncio.Event()

    @property
    def url(self) -> str:
        return self.inner.url

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ev.StoredObject:
        try:
            return await self.inner.put(key, data, content_type)
        except Unavailable:
            self.failures += 1
            if self.failures >= self.n:
                self.refused.set()
            raise

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Outage:
    store: BlobStore
    endpoint_url: str | None
    fix: Callable[[], Awaitable[None]]


async def file_outage(tmp_path: Path, _: MotoS3) -> Outage:
    root = tmp_path / "results"
    root.mkdir()
    blocker = root / "tasks"
    blocker.write_bytes(b"")  # `tasks/` cannot be created: every write fails (even as root)

    async def fix() -> None:
        blocker.unlink()

    return Outage(await open_store(f"file://{root}"), None, fix)


async def missing_bucket_outage(tmp_path: Path, server: MotoS3) -> Outage:
    bucket = unique_bucket("late")

    async def fix() -> None:
        await server.create_bucket(bucket)

    store = await open_store(f"s3://{bucket}/p", endpoint_url=server.endpoint_url)
    return Outage(store, server.endpoint_url, fix)


async def stopped_server_outage(tmp_path: Path, server: MotoS3) -> Outage:
    bucket = await server.create_bucket()
    server.stop()

    async def fix() -> None:
        server.start()  # the same port

    store = await open_store(f"s3://{bucket}/p", endpoint_url=server.endpoint_url)
    return Outage(store, server.endpoint_url, fix)


@pytest.mark.parametrize(
    "make_outage",
    [file_outage, missing_bucket_outage, stopped_server_outage],
    ids=["file-blocked", "s3-missing-bucket", "s3-server-down"],
)
async def test_a_refusing_store_makes_the_task_wait_then_it_is_stored_once(
    bus: Bus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_outage: Callable[[Path, MotoS3], Awaitable[Outage]],
) -> None:
    fake_aws_env(monkeypatch)
    server = MotoS3()
    server.start()
    try:
        outage = await make_outage(tmp_path, server)
        store = Watched(outage.store, n=6)  # three objects per attempt: two attempts refused
        task = ev.new_task_id()
        await publish_all(bus, succeeded_history(task))
        runner = asyncio.create_task(service_for(bus, store).run_until_idle())
        await asyncio.wait_for(store.refused.wait(), 30)
        assert await results_stored(bus, task) == []  # nothing claimed while not durable
        assert not runner.done()
        await outage.fix()
        await asyncio.wait_for(runner, 30)

        [stored] = await results_stored(bus, task)
        assert stored.status == "succeeded"
        await check_stored_objects(Backend("", store, outage.endpoint_url), stored)
        assert not any(isinstance(e, ev.TaskFailed) for e in await history(bus, task))
        await store.close()
    finally:
        server.stop()


async def test_a_store_that_never_recovers_is_reported_with_the_reason(
    bus: Bus, tmp_path: Path
) -> None:
    """Storage says it gave up (``StorageFailed``); ending the task is the lifecycle's job
    (test_lifecycle.py::test_storage_giving_up_ends_the_task_failed)."""
    root = tmp_path / "results"
    root.mkdir()
    (root / "tasks").write_bytes(b"")
    store = await open_store(f"file://{root}")
    task = ev.new_task_id()
    await publish_all(bus, succeeded_history(task))
    await service_for(bus, store, max_deliver=3).run_until_idle()

    events = await history(bus, task)
    assert not any(isinstance(e, ev.ResultStored) for e in events)
    assert not any(ev.is_terminal(e) for e in events)  # only the lifecycle ends tasks
    [failed] = [e for e in events if isinstance(e, ev.StorageFailed)]
    assert failed.event_id == ev.event_id(task, "StorageFailed")
    assert failed.error.code == "storage_failed"
    assert "cannot write" in failed.error.message


# ---- the program -----------------------------------------------------------------------


def settings_for(bus: Bus, nats_server: NatsServer, storage_url: str) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        nats_nkey=nats_server.auth("storage").nkey,
        storage_url=storage_url,
        stream=bus.stream.name,
        subject_prefix=bus.prefix,
        duplicate_window_s=bus.stream.duplicate_window_s,
        consumer_prefix=f"{bus.prefix}-",
    )


async def test_serve_stores_results_until_stopped(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = settings_for(bus, nats_server, f"file://{tmp_path}/results")
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop=stop))
    task = ev.new_task_id()
    await publish_all(bus, succeeded_history(task))
    stored = await wait_for(bus, task, ev.ResultStored)
    assert isinstance(stored, ev.ResultStored) and stored.status == "succeeded"
    stop.set()
    await asyncio.wait_for(server, 15)
    assert (tmp_path / f"results/tasks/{task}/result.json").is_file()


async def test_the_program_stores_over_s3_and_stops_on_sigterm(
    bus: Bus, nats_server: NatsServer, moto: MotoS3
) -> None:
    bucket = await moto.create_bucket()
    config = settings_for(bus, nats_server, f"s3://{bucket}/prod")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SANDSTREAM_"))
    } | DUMMY_ENV
    env |= {
        "SANDSTREAM_NATS_URL": config.nats_url,
        "SANDSTREAM_NATS_NKEY": str(config.nats_nkey),
        "SANDSTREAM_STORAGE_URL": config.results_url,
        "SANDSTREAM_S3_ENDPOINT_URL": moto.endpoint_url,
        "SANDSTREAM_STREAM": config.stream,
        "SANDSTREAM_SUBJECT_PREFIX": config.subject_prefix,
        "SANDSTREAM_CONSUMER_PREFIX": config.consumer_prefix,
        "SANDSTREAM_DUPLICATE_WINDOW_S": str(config.duplicate_window_s),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.storage",
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        task = ev.new_task_id()
        await publish_all(bus, succeeded_history(task))
        stored = await wait_for(bus, task, ev.ResultStored, timeout=30)
        assert isinstance(stored, ev.ResultStored)
        assert stored.location == f"s3://{bucket}/prod/tasks/{task}/"
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text
    assert "result stored" in text and "storage stopped" in text
    assert DUMMY_ENV["AWS_SECRET_ACCESS_KEY"] not in text


# ---- building the objects (pure) -------------------------------------------------------


def test_building_is_deterministic() -> None:
    task = ev.new_task_id()
    events: list[Any] = succeeded_history(task)
    one, two = build(events, events[-1]), build(events, events[-1])
    assert one == two and one.result_json == two.result_json


def test_transcript_is_ordered_by_first_line_index_and_deduplicated() -> None:
    task = ev.new_task_id()
    batches: list[Any] = [
        output(task, 3, LINES[3:], batch=1),  # arrived first
        output(task, 0, LINES[:3], batch=0),
        output(task, 0, LINES[:3], batch=0),  # re-published
        output(task, 2, LINES[2:4], batch=9),  # overlapping re-send after a re-attach
    ]
    assert build_transcript(batches).decode().splitlines() == LINES


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [({"exit_code": 2}, "exited with code 2"), ({"is_error": True, "text": "boom"}, "boom")],
)
def test_an_unsuccessful_completion_is_failed(overrides: dict[str, Any], fragment: str) -> None:
    task = ev.new_task_id()
    events: list[Any] = [requested(task), completed(task, **overrides), stopped(task)]
    result = build_result(events, events[-1])
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "cli_error"
    assert fragment in result.error.message


def test_a_success_overridden_by_a_failed_ending_is_failed() -> None:
    task = ev.new_task_id()
    error = ev.ErrorInfo(code="internal", message="lifecycle gave up")
    ending = ev.TaskFailed(event_id=ev.terminal_id(task), task_id=task, tenant=TENANT, error=error)
    events: list[Any] = [requested(task), completed(task), ending, stopped(task)]
    result = build_result(events, events[-1])
    assert result.status == "failed" and result.error == error


def test_a_lost_sandbox_is_failed() -> None:
    task = ev.new_task_id()
    events: list[Any] = [requested(task), sandbox_started(task), stopped(task, reason="vanished")]
    result = build_result(events, events[-1])
    assert result.status == "failed" and result.is_error
    assert result.error is not None and result.error.code == "sandbox_lost"
    assert "vanished" in result.error.message


def test_result_schema_names_the_contract_fields() -> None:
    schema = result_schema()
    props = schema["$defs"]["TaskResult"]["properties"]
    assert set(props) == {
        "task_id", "status", "text", "is_error", "exit_code", "num_turns", "total_cost_usd",
        "usage", "session_id", "permission_denials", "duration_ms", "diff", "files_changed",
        "sandbox", "model_usage", "error", "repo", "branch", "artifacts",
        "network", "warnings", "structured_output", "parent_task_id",
    }  # fmt: skip
    assert set(props["status"]["enum"]) == {"succeeded", "failed", "cancelled", "timed_out"}


async def test_a_forged_sandbox_stopped_stores_nothing(bus: Bus, tmp_path: Path) -> None:
    """The storage consumer refuses a misfiled event: nothing written, nothing published."""
    store = await open_store(f"file://{tmp_path}/results")
    service = service_for(bus, store)
    honest, other = ev.new_task_id(), ev.new_task_id()
    await publish_all(bus, succeeded_history(honest)[:-1])
    for subject, forged in (
        (f"{bus.prefix}.{tmp_path}.SandboxStopped", stopped(str(tmp_path))),  # a path for an id
        (bus.subject(other, "SandboxStopped"), stopped(honest)),  # another task's subject
    ):
        await bus.js.publish(subject, ev.encode(forged), stream=bus.stream.name)
    await service.worker.run_until_idle()
    await store.close()
    assert await results_stored(bus, honest) == []
    assert not (tmp_path / "results").exists()


async def test_results_on_disk_are_private(bus: Bus, tmp_path: Path) -> None:
    store = await open_store(f"file://{tmp_path}/results")
    service = service_for(bus, store)
    task = ev.new_task_id()
    await publish_all(bus, succeeded_history(task))
    await service.worker.run_until_idle()
    await store.close()
    folder = tmp_path / "results" / "tasks" / task
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    for path in folder.iterdir():
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


async def test_a_branch_and_its_bundle_are_part_of_the_result(bus: Bus, tmp_path: Path) -> None:
    """What the executor stored itself (a branch's bundle) is listed with the result; a
    bundle it claims in another task's folder is not."""
    store = await open_store(f"file://{tmp_path}/results")
    service = service_for(bus, store)
    task, other = ev.new_task_id(), ev.new_task_id()
    bundle = ev.StoredObject(key=f"tasks/{task}/changes.bundle", size=10, sha256="ab" * 32)
    branch = ev.BranchInfo(name="fix", commit="c" * 40, base="b" * 40, pushed=True, bundle=bundle)
    prepared = ev.WorkspacePrepared(
        event_id=ev.event_id(task, "WorkspacePrepared"),
        task_id=task,
        tenant="acme",
        url="https://example.com/app.git",
        ref="main",
        commit="b" * 40,
    )
    packed = ev.StoredObject(key=f"tasks/{task}/artifacts.tar.gz", size=20, sha256="cd" * 32)
    artifacts = ev.ArtifactsInfo(files=["dist/app.js"], object=packed)
    events = succeeded_history(task)
    events[-2] = completed(task, branch=branch, artifacts=artifacts)
    await publish_all(bus, [*events[:2], prepared, *events[2:]])
    forged = msgspec.structs.replace(
        branch, bundle=msgspec.structs.replace(bundle, key=f"tasks/{task}/changes.bundle")
    )
    stray = succeeded_history(other)
    stray[-2] = completed(other, branch=forged)
    await publish_all(bus, stray)
    stored = await service.store_result(events[-1])  # type: ignore[arg-type]
    stray_stored = await service.store_result(stray[-1])  # type: ignore[arg-type]
    await store.close()
    assert stored is not None and stray_stored is not None
    assert bundle in stored.objects and packed in stored.objects
    assert not any(o.key.endswith("changes.bundle") for o in stray_stored.objects)
    result = msgspec.json.decode(
        (tmp_path / "results" / "tasks" / task / "result.json").read_bytes()
    )
    assert result["repo"] == {
        "url": "https://example.com/app.git",
        "ref": "main",
        "commit": "b" * 40,
    }
    assert result["branch"] == {"name": "fix", "commit": "c" * 40, "base": "b" * 40, "pushed": True}
    assert result["artifacts"] == {
        "files": ["dist/app.js"],
        "key": packed.key,
        "size": 20,
        "sha256": "cd" * 32,
    }
