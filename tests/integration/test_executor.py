"""The executor against real parts: dockerd, the sandbox image with the real CLI, nats-server,
and the scripted fake Messages API as the model proxy's upstream.

The sandbox is created here with :class:`shared.sandbox.DockerDriver` and the same hardened
configuration the lifecycle uses; the test publishes ``TaskRequested`` and ``SandboxStarted``
itself, so nothing but the executor is under test. Skipped when Docker or the image is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import ssl
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import structlog
import structlog.testing
from aiohttp import web

from services.executor import agent
from services.executor.service import Executor, ExecutorConfig
from services.modelproxy.egress import EgressProxy
from services.modelproxy.proxy import Credential, ModelProxy
from services.storage.build import build_transcript
from shared import events as ev
from shared import inputs, launch
from shared.blobstore import BlobStore, open_store, sha256_hex
from shared.bus import Bus
from shared.egress import Pin, parse_pins
from shared.errors import Unavailable
from shared.sandbox import (
    KEEPER_UID,
    DockerDriver,
    SandboxSpec,
    sandbox_name,
    share_with_sandbox,
)
from shared.secrets import set_secret
from shared.settings import DEFAULT_IMAGE
from shared.worker import Delivery
from tests.fakes.model import FakeModel, Reply, Text, ToolUse
from tests.support.git import GitHttpServer, git, make_repo, rev
from tests.support.procs import NatsServer
from tests.support.sandboxes import wait_for_event
from tests.support.serve import serving
from tests.support.tls import self_signed

pytestmark = pytest.mark.docker

SECRET = "sk-ant-test-" + uuid.uuid4().hex
TENANT = "acme"


@pytest_asyncio.fixture
async def driver() -> AsyncIterator[DockerDriver]:
    try:
        d = await DockerDriver.connect()
    except Unavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        try:
            await d.docker.images.inspect(DEFAULT_IMAGE)
        except Exception:
            pytest.skip(f"sandbox image {DEFAULT_IMAGE} missing: run `make image`")
        yield d
    finally:
        await d.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short on purpose: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="ss-exec-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeModel]:
    async with FakeModel() as f:
        yield f


@dataclass
class Harness:
    bus: Bus
    driver: DockerDriver
    fake: FakeModel
    socket_dir: Path
    sandboxes: list[str]

    def proxy(
        self, credential: Credential | None = None, *, pins: dict[str, Pin] | None = None
    ) -> ModelProxy:
        egress = EgressProxy(socket_dir=self.socket_dir, pins=pins)
        return ModelProxy(
            socket_dir=self.socket_dir, upstream=self.fake.url, credential=credential, egress=egress
        )

    def executor(self, proxy: ModelProxy, **options: Any) -> Executor:
        """An executor on this harness's bus and engine, through ``proxy``."""
        return Executor(bus=self.bus, driver=self.driver, proxy=proxy, **options)

    async def sandbox(self, task_id: str, *, launcher: bool = False, **options: Any) -> str:
        """A hardened sandbox exactly as the lifecycle makes it, started (with ``launcher``, as
        it makes a warm-pool one: the agent's launcher waiting in it)."""
        folder = self.socket_dir / task_id
        folder.mkdir()
        share_with_sandbox(folder)
        spec = SandboxSpec(
            task_id=task_id,
            tenant=TENANT,
            image=DEFAULT_IMAGE,
            deadline=time.time() + 600,
            model_socket_dir=str(folder),
            pooled=launcher,  # made as a pool one: its engine label says so
            **options,
        )
        info = await self.driver.create(spec)
        self.sandboxes.append(info.name)
        await self.driver.start(info.name)
        if launcher:
            await launch.start(self.driver, info.name)
        return info.name

    async def submit(
        self,
        prompt: str,
        *,
        sandbox: dict[str, Any] | None = None,
        setup: str | None = None,
        publish_started: bool = True,
        **spec: object,
    ) -> tuple[str, ev.SandboxStarted]:
        """TaskRequested, a started sandbox, and SandboxStarted: what the executor waits for.

        ``setup`` is a bash command run in the sandbox first (to seed the workspace). Without
        ``publish_started`` the SandboxStarted is made but left for the caller to publish.
        """
        task_id = ev.new_task_id()
        await self.bus.publish(
            ev.TaskRequested(
                event_id=ev.event_id(task_id, "TaskRequested"),
                task_id=task_id,
                tenant=TENANT,
                spec=msgspec.convert({"prompt": prompt, **spec}, ev.TaskSpec),
            )
        )
        name = await self.sandbox(task_id, **(sandbox or {}))
        if setup is not None:
            done = await self.driver.exec(name, ["bash", "-c", setup], workdir="/workspace")
            assert done.exit_code == 0, done.output
        started = ev.SandboxStarted(
            event_id=ev.event_id(task_id, "SandboxStarted"),
            task_id=task_id,
            tenant=TENANT,
            sandbox=name,
            image=DEFAULT_IMAGE,
        )
        if publish_started:
            await self.bus.publish(started)
        return task_id, started

    async def history(self, task_id: str) -> list[ev.AnyEvent]:
        return [r.event async for r in self.bus.read(self.bus.task_filter(task_id))]

    async def raw_history(self) -> list[bytes]:
        """Every stored message of the test's stream, as the bytes on the wire."""
        out = []
        last = await self.bus.last_sequence()
        for seq in range(1, last + 1):
            msg = await self.bus.js.get_msg(self.bus.stream.name, seq)
            assert msg.data is not None
            out.append(msg.data)
        return out


@pytest_asyncio.fixture
async def harness(
    bus: Bus, driver: DockerDriver, fake: FakeModel, socket_dir: Path
) -> AsyncIterator[Harness]:
    h = Harness(bus, driver, fake, socket_dir, [])
    yield h
    for name in h.sandboxes:
        await driver.remove(name)


def marker() -> str:
    return f"[task {uuid.uuid4().hex[:10]}]"


def ends(events: list[ev.AnyEvent]) -> list[ev.ExecutionCompleted | ev.ExecutionFailed]:
    return [e for e in events if isinstance(e, ev.ExecutionCompleted | ev.ExecutionFailed)]


def output_lines(events: list[ev.AnyEvent]) -> list[str]:
    return [line for e in events if isinstance(e, ev.AgentOutput) for line in e.lines]


async def test_write_task_completes_with_diff_and_the_key_stays_outside(
    harness: Harness,
) -> None:
    tag = marker()
    harness.fake.script(
        match=tag, replies=[ToolUse.write("hello.txt", "hi\n"), Text("Wrote hello.txt")]
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, sandbox_started = await harness.submit(
            f"write hello {tag}", setup="echo seed > seed.txt && mkdir docs && echo d > docs/d.md"
        )
        with structlog.testing.capture_logs() as logged:
            await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    # The pinned CLI sends only fields the proxy forwards: nothing of its was dropped.
    assert not [e for e in logged if e["event"] == "model request fields removed"], logged

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.event_id == f"{task_id}:ExecutionEnded:1"
    assert end.exit_code == 0 and end.is_error is False
    assert end.text == "Wrote hello.txt"
    assert end.files_changed == ["hello.txt"]
    assert "+++ b/hello.txt" in end.diff and "+hi" in end.diff
    assert end.num_turns >= 2 and end.session_id
    listing = await harness.driver.exec(sandbox_name(task_id), ["ls", "-a", "/workspace"])
    assert listing.output.split() == [b".", b"..", b"docs", b"hello.txt", b"seed.txt"]
    assert end.permission_denials == []
    assert end.model_usage.requests >= 2
    assert end.model_usage.input_tokens >= 200 and end.model_usage.output_tokens >= 40
    assert end.model_usage.cost_usd > 0

    types = [ev.type_name(type(e)) for e in events]
    assert types[:3] == ["TaskRequested", "SandboxStarted", "ExecutionStarted"]
    assert types[-1] == "ExecutionCompleted"
    started = next(e for e in events if isinstance(e, ev.ExecutionStarted))
    assert started.event_id == f"{task_id}:ExecutionStarted:1"
    outputs = [e for e in events if isinstance(e, ev.AgentOutput)]
    assert outputs and outputs[0].event_id == f"{task_id}:AgentOutput:0"
    lines = output_lines(events)
    assert json.loads(lines[0])["type"] == "system"
    assert json.loads(lines[-1])["type"] == "result"

    # The real key reached the model; the sandbox and the events only ever had the placeholder.
    main = harness.fake.main_requests()
    assert main and {r.api_key for r in harness.fake.requests} == {SECRET}
    inspect = await harness.driver.inspect(sandbox_name(task_id))
    assert inspect is not None
    assert SECRET not in json.dumps(inspect)
    for raw in await harness.raw_history():
        assert SECRET.encode() not in raw
    elapsed = (end.at - sandbox_started.at).total_seconds()
    print(f"\nSandboxStarted → ExecutionCompleted (a write, then a text reply): {elapsed:.3f}s")


async def test_denied_bash_call_is_reported(harness: Harness) -> None:
    tag = marker()
    command = "python3 -c 'print(1)'"
    harness.fake.script(match=tag, replies=[ToolUse.bash(command), Text("could not run it")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"run python {tag}")
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionCompleted), end
    denials = [(d["tool_name"], d["tool_input"]["command"]) for d in end.permission_denials]
    assert denials == [("Bash", command)]
    assert end.text == "could not run it"
    assert end.files_changed == [] and end.diff == ""


async def test_no_credential_fails_without_running_the_agent(harness: Harness) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("should never be asked")])
    async with harness.proxy(None) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"hello {tag}")
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed)
    assert end.code == "no_credential"
    assert "ANTHROPIC_API_KEY" in end.message
    assert not any(isinstance(e, ev.ExecutionStarted | ev.AgentOutput) for e in events)
    assert harness.fake.requests == []
    probe = await harness.driver.exec(sandbox_name(task_id), ["ls", "-a", "/tmp"])
    assert b".sandstream-run" not in probe.output  # the run was never even claimed


async def test_cli_error_is_reported_as_failure(harness: Harness) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("never")])
    harness.fake.fail_next(50, status=400, match=tag)
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"bad request {tag}")
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionFailed), end
    assert end.code == "cli_error"
    assert end.message


async def test_a_run_past_its_token_budget_ends_budget_exceeded(harness: Harness) -> None:
    """The proxy counts what the upstream reports; the call after the cap is refused, the CLI
    gives up, and the task says why, with the usage so far."""
    tag = marker()
    harness.fake.script(
        match=tag,
        replies=[
            Reply(ToolUse.write("a.txt", "a\n"), input_tokens=400, output_tokens=100),
            Text("never reached"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"spend {tag}", max_tokens=300)
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionFailed), end
    assert end.code == "budget_exceeded", end.message
    assert "its max_tokens is 300" in end.message
    assert end.model_usage.input_tokens >= 400 and end.model_usage.output_tokens >= 100
    assert len(harness.fake.main_requests()) == 1  # the second call never left the proxy


async def test_a_stopped_executor_is_replaced_and_the_agent_runs_once(harness: Harness) -> None:
    """In process: the executor's worker is stopped mid-run and its proxy closed. The same
    story with a SIGKILLed process is test_sigkilled_executor_process_is_replaced_…"""
    tag = marker()
    release = asyncio.Event()
    harness.fake.script(
        match=tag,
        replies=[ToolUse.write("a.txt", "a\n"), Reply(Text("finished"), hold=release)],
    )
    proxy = await harness.proxy(Credential("api_key", SECRET)).start()
    first = harness.executor(proxy)
    first_worker = first.worker(ack_wait=2.0)
    run = asyncio.create_task(first_worker.run())
    try:
        task_id, _ = await harness.submit(f"two steps {tag}")
        # The agent is mid-run: the second model turn is being held by the fake.
        await harness.fake.wait_for(
            lambda: any(r.reply_index == 1 for r in harness.fake.main_requests()), 60
        )
        name = sandbox_name(task_id)
        environ = await harness.driver.exec(
            name, ["bash", "-c", f"tr '\\0' '\\n' </proc/$(cat {agent.RUN_DIR}/pid)/environ"]
        )
        assert f"ANTHROPIC_API_KEY={agent.PLACEHOLDER_KEY}".encode() in environ.output
        assert SECRET.encode() not in environ.output
    finally:
        # The executor dies: its handler is cut off, unacked, and its proxy goes away.
        await first_worker.stop(timeout=0)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await proxy.close()

    second_proxy = await harness.proxy(Credential("api_key", SECRET)).start()
    try:
        assert await second_proxy.adopt_existing() == [task_id]
        second = Executor(bus=harness.bus, driver=harness.driver, proxy=second_proxy)
        worker = second.worker(ack_wait=2.0)
        rerun = asyncio.create_task(worker.run_until_idle(idle_timeout=3.0))
        # The CLI's retry of the held call arrives through the new proxy; then let it finish.
        await harness.fake.wait_for(
            lambda: sum(r.reply_index == 1 for r in harness.fake.main_requests()) >= 2, 60
        )
        release.set()
        await asyncio.wait_for(rerun, 120)
    finally:
        release.set()
        await second_proxy.close()

    events = await harness.history(task_id)
    assert harness.fake.conversations_matching(tag) == 1
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.text == "finished" and end.files_changed == ["a.txt"]
    assert sum(isinstance(e, ev.ExecutionStarted) for e in events) == 1
    lines = output_lines(events)
    assert len(lines) == len(set(lines)), "a line was published twice"
    assert [json.loads(line)["type"] for line in lines][-1] == "result"
    kinds = [(obj["type"], obj.get("subtype")) for obj in map(json.loads, lines)]
    assert kinds.count(("system", "init")) == 1, kinds


async def test_agent_past_its_deadline_is_stopped_as_timeout(harness: Harness) -> None:
    tag = marker()
    never = asyncio.Event()
    harness.fake.script(match=tag, replies=[Reply(Text("too late"), hold=never)])
    config = ExecutorConfig(deadline_grace_s=0.0)
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=config)
        task_id, _ = await harness.submit(f"think forever {tag}", timeout_s=2)
        try:
            await asyncio.wait_for(executor.worker().run_until_idle(), 60)
        finally:
            never.set()
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionFailed), end
    assert end.code == "timeout" and "timeout_s of 2 seconds" in end.message
    assert end.exit_code == 143  # the agent got SIGTERM and its status was still recorded


async def test_sandbox_removed_mid_run_is_sandbox_lost(harness: Harness) -> None:
    tag = marker()
    hold = asyncio.Event()
    harness.fake.script(match=tag, replies=[Reply(Text("never seen"), hold=hold)])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"vanish {tag}")
        run = asyncio.create_task(executor.worker().run_until_idle())
        try:
            await harness.fake.wait_for(lambda: harness.fake.conversations_matching(tag) == 1, 60)
            await harness.driver.remove(sandbox_name(task_id))
            await asyncio.wait_for(run, 60)
        finally:
            hold.set()
        events = await harness.history(task_id)

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed), end
    assert end.code == "sandbox_lost"
    assert not (harness.socket_dir / task_id / "model.sock").exists()


async def test_sandbox_removed_after_the_task_ended_publishes_no_end(harness: Harness) -> None:
    """After the terminal event only the run's last output batch may still land (lines the
    agent wrote before the kill, kept for the audit); never an end, never a new run."""
    tag = marker()
    hold = asyncio.Event()
    harness.fake.script(match=tag, replies=[Reply(Text("never seen"), hold=hold)])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"cancelled {tag}")
        run = asyncio.create_task(executor.worker().run_until_idle())
        try:
            await harness.fake.wait_for(lambda: harness.fake.conversations_matching(tag) == 1, 60)
            # What the lifecycle does on a cancel: the terminal event first, then the kill.
            ack = await harness.bus.publish(
                ev.TaskCancelled(
                    event_id=ev.terminal_id(task_id), task_id=task_id, tenant=TENANT, reason="t"
                )
            )
            await harness.driver.remove(sandbox_name(task_id))
            await asyncio.wait_for(run, 60)
        finally:
            hold.set()
        bus = harness.bus
        after = [r.event async for r in bus.read(bus.task_filter(task_id), from_seq=ack.seq + 1)]

    assert all(isinstance(e, ev.AgentOutput) for e in after), after
    assert len(after) <= 1
    assert ends(await harness.history(task_id)) == []


async def test_a_warm_sandboxs_launcher_starts_the_run_and_a_plain_one_starts_by_exec(
    harness: Harness,
) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("ran")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        warm, _ = await harness.submit(f"warm {tag}", sandbox={"launcher": True})
        plain, _ = await harness.submit(f"plain {tag}")
        with structlog.testing.capture_logs() as logged:
            await executor.worker().run_until_idle()
        for task_id in (warm, plain):
            (end,) = ends(await harness.history(task_id))
            assert isinstance(end, ev.ExecutionCompleted) and end.text == "ran", end
    how = sorted(e["how"] for e in logged if e["event"] == "agent run")
    assert how == sorted(["launched", agent.MARK_STARTED])  # the plain one: by exec
    # The launcher in the sandbox ran the start (as the agent), which started the run.
    said = await harness.driver.exec(sandbox_name(warm), ["cat", launch.LOG])
    assert said.output.decode().strip() == agent.MARK_STARTED
    # The start came from the keeper (a file of its own), and the launcher is gone: it ran
    # once (a re-attach starts by exec). The agent can neither rewrite it nor ring anyone.
    seen = await harness.driver.exec(
        sandbox_name(warm),
        ["bash", "-c", f"stat -c %u {launch.REQUEST}; test -e {launch.BELL} || echo gone; "
         f"(echo x >>{launch.REQUEST}) 2>/dev/null || echo refused"],
    )  # fmt: skip
    assert seen.output.decode().split() == [str(KEEPER_UID), "gone", "refused"], seen


async def test_a_warm_sandbox_whose_launcher_died_starts_its_run_by_exec(
    harness: Harness,
) -> None:
    """The keeper rings a bell nobody listens to any more: it says so within a second, and
    the run starts by exec, not after the minute a follow waits for a run to appear."""
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("ran anyway")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        warm, _ = await harness.submit(f"orphaned bell {tag}", sandbox={"launcher": True})
        kill = (
            f"for i in $(seq 500); do [ -p {launch.BELL} ] && break; sleep 0.01; done; "
            "for f in /proc/[0-9]*/cmdline; do "
            "  if tr '\\0' ' ' <$f 2>/dev/null | grep -q 'sandstream-launc[h]'; then "
            "    p=${f#/proc/}; kill -KILL ${p%/cmdline} && echo killed; fi; "
            f"done; test -p {launch.BELL} && echo bell"
        )
        said = await harness.driver.exec(sandbox_name(warm), ["bash", "-c", kill])
        assert said.output.decode().split() == ["killed", "bell"], said
        with structlog.testing.capture_logs() as logged:
            async with asyncio.timeout(30):  # far below the follow's minute
                await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(warm))
        assert isinstance(end, ev.ExecutionCompleted) and end.text == "ran anyway", end
    assert [e["how"] for e in logged if e["event"] == "agent run"] == [agent.MARK_STARTED]


async def test_redelivery_after_the_end_changes_nothing(harness: Harness) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("once")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, started = await harness.submit(f"once {tag}")
        await executor.worker().run_until_idle()
        before = await harness.history(task_id)
        delivery = Delivery(seq=2, subject="x", num_delivered=2, max_deliver=8)
        await executor.handle(started, delivery)
        after = await harness.history(task_id)

    assert [e.event_id for e in after] == [e.event_id for e in before]
    assert harness.fake.conversations_matching(tag) == 1
    (end,) = ends(after)
    assert isinstance(end, ev.ExecutionCompleted) and end.text == "once"


async def followers(harness: Harness, name: str, *, count: int, within: float = 30) -> None:
    """Wait until ``count`` execs follow the run's output in sandbox ``name``."""
    probe = (
        'n=0; for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$f" 2>/dev/null'
        ' | grep -q "^tail .*--pid=" && n=$((n+1)); done; echo $n'
    )
    async with asyncio.timeout(within):
        while True:
            done = await harness.driver.exec(name, ["bash", "-c", probe])
            if int(done.output.decode().strip() or 0) >= count:
                return
            await asyncio.sleep(0.05)


async def test_redelivery_mid_run_reattaches_without_a_second_agent(harness: Harness) -> None:
    """Two handlers for one SandboxStarted at once (a lost ack): one agent, one end."""
    tag = marker()
    release = asyncio.Event()
    harness.fake.script(match=tag, replies=[Reply(Text("shared"), hold=release)])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, started = await harness.submit(f"twice {tag}")
        d1 = Delivery(seq=2, subject="x", num_delivered=1, max_deliver=8)
        d2 = Delivery(seq=2, subject="x", num_delivered=2, max_deliver=8)
        first = asyncio.create_task(executor.handle(started, d1))
        await harness.fake.wait_for(lambda: harness.fake.conversations_matching(tag) == 1, 60)
        second = asyncio.create_task(executor.handle(started, d2))
        # Release the agent only once both handlers follow its output inside the sandbox.
        await followers(harness, sandbox_name(task_id), count=2)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 60)
        events = await harness.history(task_id)

    assert harness.fake.conversations_matching(tag) == 1
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted) and end.text == "shared"
    # The two followers may cut their batches at different lines, so the stream can hold a
    # line twice; the transcript storage builds has each line once, in order.
    lines = build_transcript(events).decode().splitlines()
    assert len(lines) == len(set(lines)) == len(set(output_lines(events)))
    assert json.loads(lines[-1])["type"] == "result"


async def test_huge_output_lines_are_truncated_and_batches_bounded(harness: Harness) -> None:
    tag = marker()
    content = "x" * 300_000 + "\n"
    harness.fake.script(match=tag, replies=[ToolUse.write("big.txt", content), Text("big")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"write big {tag}")
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.files_changed == ["big.txt"] and "+" + "x" * 1000 in end.diff
    outputs = [e for e in events if isinstance(e, ev.AgentOutput)]
    assert all(len(ev.encode(e)) <= 256 * 1024 for e in outputs)
    assert any("[sandstream: line truncated" in line for line in output_lines(events))
    assert [o.batch for o in outputs] == list(range(len(outputs)))
    firsts = [int(o.event_id.rsplit(":", 1)[1]) for o in outputs]
    assert firsts == [sum(len(o.lines) for o in outputs[:i]) for i in range(len(outputs))]


async def test_an_output_flood_is_cut_at_the_cap_and_ends_output_limit(harness: Harness) -> None:
    """The hostile agent of the review: it appends to its run's own output file, far past the
    cap. The executor keeps at most the cap, stops the run, and says why."""
    tag = marker()
    flood = f'yes \'{{"type":"noise"}}\' | head -c 3000000 >> {agent.RUN_DIR}/out.jsonl'
    never = asyncio.Event()  # the agent's next model call waits until the run is stopped
    harness.fake.script(
        match=tag, replies=[ToolUse.bash(flood), Reply(Text("after the flood"), hold=never)]
    )
    config = ExecutorConfig(max_output_bytes=1024 * 1024)
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=config)
        task_id, _ = await harness.submit(f"flood {tag}", allowed_tools=["Bash"])
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed), end
    assert end.code == "output_limit" and "1048576 bytes" in end.message
    outputs = [e for e in events if isinstance(e, ev.AgentOutput)]
    kept = sum(len(line.encode()) + 4 for o in outputs for line in o.lines)
    assert 900 * 1024 < kept <= 1024 * 1024 == config.max_output_bytes
    assert outputs[-1].output_bytes == kept
    assert end.exit_code != 0  # stopped, not finished: its last model call was still held


FORGER = r"""
cd /workspace
echo evil > evil.txt
echo s > locked.txt && chmod 000 locked.txt
mkdir hidden && echo s > hidden/x && chmod 700 hidden
# Left out by git unless told: an ignored file and a git folder.
echo ignored.env > .gitignore && echo token > ignored.env
mkdir -p sub/.git && echo '[core]' > sub/.git/config
# Every argv and environment the agent's user can read, searched for the end marker.
for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do tr '\0' '\n' <"$f" 2>/dev/null; done \
    | grep -oE 'sandstream-end-[0-9a-f]{32}' | sort -u >/tmp/nonces
echo "seen=$(wc -l </tmp/nonces)" >seen.txt
# With a nonce, a block claiming no changes would end the follower's stream here.
while read -r n; do
    printf '%s\nexit=0\npid=1\noom=0\nstderr=\nfiles=0\n%s.done\n' "$n" "$n" \
        >>/tmp/.sandstream-run/out.jsonl
done </tmp/nonces
# The record of the workspace before the run: neither writable nor readable.
echo forged >KEEPER/base 2>>seen.txt
ls KEEPER >>seen.txt 2>&1
true
""".replace("KEEPER", agent.KEEPER_DIR)


async def test_what_the_result_says_about_changes_is_not_the_agents_to_forge(
    harness: Harness,
) -> None:
    """The agent looks for the follower's end marker wherever its user can read, forges the
    closing block with what it finds, tries to rewrite the record of the workspace, and hides
    two paths from everyone else. The result still lists its changes, names what it hid, and
    keeps the output it wrote as output."""
    tag = marker()
    harness.fake.script(match=tag, replies=[ToolUse.bash(FORGER), Text("nothing changed")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"forge {tag}", allowed_tools=["Bash"])
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)

    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.text == "nothing changed"  # the CLI's own word; the changes below are not
    assert "+seen=0\n" in end.diff, end.diff
    assert "Permission denied" in end.diff  # the keeper's folder: not writable, not listed
    assert set(end.files_changed) == {
        "evil.txt", "seen.txt", "locked.txt", "hidden", ".gitignore", "ignored.env", "sub/.git"
    }  # fmt: skip
    assert "+evil\n" in end.diff and "+token\n" in end.diff
    assert "3 workspace paths could not be recorded" in end.diff and "sub/.git" in end.diff


async def test_nothing_of_the_agent_runs_while_its_changes_are_collected(harness: Harness) -> None:
    """A process the agent leaves behind (in a session of its own, so not the run's) could
    change the workspace while the keeper reads it: every process of the agent's user is
    stopped first."""
    tag = marker()
    left = "setsid bash -c 'while :; do date >> /workspace/late.txt; sleep 0.05; done' " + (
        ">/dev/null 2>&1 </dev/null & echo started"
    )
    harness.fake.script(match=tag, replies=[ToolUse.bash(left), Text("left something")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"leave {tag}", allowed_tools=["Bash"])
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))
        name = sandbox_name(task_id)
        probe = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <\"$f\"; echo; done"
        running = (await harness.driver.exec(name, ["bash", "-c", probe])).output.decode()

    assert isinstance(end, ev.ExecutionCompleted), end
    assert "while :" not in running, running  # stopped before the end was reported
    assert "late.txt" in end.files_changed


async def test_agent_killed_for_memory_is_oom(harness: Harness) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("unreachable")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        # Far too little memory for the CLI itself: the kernel kills it as it starts.
        task_id, _ = await harness.submit(
            f"no room {tag}", sandbox={"memory_bytes": 48 * 1024 * 1024}
        )
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionFailed), end
    assert (end.code, end.exit_code) == ("oom", 137), end


async def test_a_message_that_keeps_failing_ends_the_execution_as_internal(
    harness: Harness,
) -> None:
    # A SandboxStarted whose task was never requested: every delivery fails (Retry).
    task_id = ev.new_task_id()
    await harness.bus.publish(
        ev.SandboxStarted(
            event_id=ev.event_id(task_id, "SandboxStarted"),
            task_id=task_id,
            tenant=TENANT,
            sandbox=sandbox_name(task_id),
            image=DEFAULT_IMAGE,
        )
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        await asyncio.wait_for(executor.worker(max_deliver=2).run_until_idle(), 30)
        (end,) = ends(await harness.history(task_id))

    assert isinstance(end, ev.ExecutionFailed)
    assert end.code == "internal" and "TaskRequested" in end.message
    assert end.event_id == f"{task_id}:ExecutionEnded:1"


# ---- the executor as a process ---------------------------------------------------------------


def service_env(harness: Harness, nats: NatsServer, proxy_socket: Path) -> dict[str, str]:
    """The environment of an executor process (the model credential left out) and of its
    model proxy process (which gets :data:`SECRET` added)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY")
    }
    env.update(
        **nats.env("executor"),
        SANDSTREAM_STREAM=harness.bus.stream.name,
        SANDSTREAM_SUBJECT_PREFIX=harness.bus.stream.subject_prefix,
        SANDSTREAM_DUPLICATE_WINDOW_S=str(harness.bus.stream.duplicate_window_s),
        SANDSTREAM_SOCKET_DIR=str(harness.socket_dir),
        SANDSTREAM_PROXY_SOCKET=str(proxy_socket),
        SANDSTREAM_MODEL_UPSTREAM=harness.fake.url,
        SANDSTREAM_ACK_WAIT_S="2",
    )
    return env


REPO = Path(__file__).resolve().parents[2]


async def start_service(name: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{name}", env=env, stdout=out, stderr=out,
            cwd=str(REPO),
        )  # fmt: skip


async def test_sigkilled_executor_process_is_replaced_and_the_agent_runs_once(
    harness: Harness, nats_server: NatsServer, tmp_path: Path
) -> None:
    tag = marker()
    release = asyncio.Event()
    harness.fake.script(
        match=tag,
        replies=[ToolUse.write("b.txt", "b\n"), Reply(Text("survived"), hold=release)],
    )
    env = service_env(harness, nats_server, tmp_path / "proxy.sock")
    log = tmp_path / "executor.log"
    model_proxy = await start_service(
        "modelproxy", env | {"ANTHROPIC_API_KEY": SECRET}, tmp_path / "proxy.log"
    )
    proc = await start_service("executor", env, log)
    try:
        task_id, _ = await harness.submit(f"survive {tag}")
        await harness.fake.wait_for(
            lambda: any(r.reply_index == 1 for r in harness.fake.main_requests()), 60
        )
        proc.kill()
        await proc.wait()
        proc = await start_service("executor", env, log)
        # The model proxy is another process: the agent's held call survives the executor.
        # Once the redelivered message has the new executor following the agent, answer it.
        async with asyncio.timeout(60):
            while log.read_text().count('"following the agent"') < 2:
                await asyncio.sleep(0.05)
        release.set()
        end = await wait_for_end(harness, task_id, 60)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0, log.read_text()[-3000:]
    finally:
        release.set()
        for each in (proc, model_proxy):
            if each.returncode is None:
                each.kill()
                await each.wait()

    assert isinstance(end, ev.ExecutionCompleted), (end, log.read_text()[-3000:])
    assert end.text == "survived" and end.files_changed == ["b.txt"]
    assert harness.fake.conversations_matching(tag) == 1
    events = await harness.history(task_id)
    assert len(ends(events)) == 1
    assert SECRET not in log.read_text()
    for raw in await harness.raw_history():
        assert SECRET.encode() not in raw


async def wait_for_end(
    harness: Harness, task_id: str, within: float
) -> ev.ExecutionCompleted | ev.ExecutionFailed:
    async with asyncio.timeout(within):
        async for record in harness.bus.read(harness.bus.task_filter(task_id), follow=True):
            if isinstance(record.event, ev.ExecutionCompleted | ev.ExecutionFailed):
                return record.event
    raise AssertionError("unreachable")


async def test_a_forged_sandbox_started_runs_nothing(harness: Harness) -> None:
    """The executor's consumer refuses a misfiled SandboxStarted: no exec, no model call."""
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("should never be asked")])
    task_id, forged = await harness.submit(f"hello {tag}", publish_started=False)
    name = sandbox_name(task_id)
    other = ev.new_task_id()  # filed under another task's subject
    bus = harness.bus
    await bus.js.publish(bus.subject(other, "SandboxStarted"), ev.encode(forged))
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = Executor(bus=bus, driver=harness.driver, proxy=proxy)
        await executor.worker().run_until_idle()
    assert [type(e).__name__ for e in await harness.history(task_id)] == ["TaskRequested"]
    assert harness.fake.requests == []
    probe = await harness.driver.exec(name, ["ls", "-a", "/tmp"])
    assert b".sandstream-run" not in probe.output


# ---- a repository in the workspace -----------------------------------------------------------


def repo_config(tmp_path: Path) -> ExecutorConfig:
    return ExecutorConfig(
        workspaces_dir=tmp_path / "workspaces",
        secrets_path=tmp_path / "secrets",
        allow_file_repos=True,
    )


async def test_the_agent_works_in_a_checkout_and_the_diff_is_against_its_commit(
    harness: Harness, tmp_path: Path
) -> None:
    bare = make_repo(tmp_path / "repos", "app", {"README.md": "hello\n", "src/app.py": "x = 1\n"})
    commit = rev(bare, "main")
    tag = marker()
    # The agent edits a tracked file and looks at the checkout from inside.
    harness.fake.script(
        match=tag,
        replies=[
            ToolUse.bash(
                "sed -i s/hello/goodbye/ README.md && git rev-parse HEAD > /tmp/head "
                "&& git symbolic-ref --short HEAD >> /tmp/head && git status --short >> /tmp/head"
            ),
            Text("edited"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path))
        task_id, _ = await harness.submit(
            f"edit the readme {tag}",
            repo={"url": f"file://{bare}", "ref": "main"},
            allowed_tools=["Bash"],
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    types = [ev.type_name(type(e)) for e in events]
    assert types[:4] == ["TaskRequested", "SandboxStarted", "WorkspacePrepared", "ExecutionStarted"]
    prepared = next(e for e in events if isinstance(e, ev.WorkspacePrepared))
    assert (prepared.commit, prepared.ref, prepared.url) == (commit, "main", f"file://{bare}")
    assert prepared.bytes > 0
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.files_changed == ["README.md"]  # not .git, not the checkout itself
    assert "-hello" in end.diff and "+goodbye" in end.diff and "[sandstream:" not in end.diff
    seen = await harness.driver.exec(sandbox_name(task_id), ["cat", "/tmp/head"])
    assert seen.output.decode().splitlines() == [commit, "main", " M README.md"]
    owners = await harness.driver.exec(
        sandbox_name(task_id), ["find", "/workspace", "!", "-user", "agent", "-print", "-quit"]
    )
    assert owners.output == b""  # everything copied in is the agent's
    assert not (tmp_path / "workspaces" / task_id).exists()  # the host's copy is gone


async def test_a_repository_that_cannot_be_fetched_fails_the_run_before_it_starts(
    harness: Harness, tmp_path: Path
) -> None:
    bare = make_repo(tmp_path / "repos", "app", {"README.md": "hello\n"})
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path))
        task_id, _ = await harness.submit(
            "never runs", repo={"url": f"file://{bare}", "ref": "no-such-branch"}
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed) and end.code == "workspace_error"
    assert "no branch, tag or commit 'no-such-branch'" in end.message
    assert not any(isinstance(e, ev.ExecutionStarted | ev.WorkspacePrepared) for e in events)
    assert not harness.fake.main_requests()


async def test_the_agents_changes_come_back_as_a_pushed_branch_and_a_bundle(
    harness: Harness, tmp_path: Path
) -> None:
    """The agent edits a file of the checked-out repository and adds one; the origin (smart
    HTTP with authentication) gets a branch with exactly those changes, once; the bundle holds
    the same commit; the credential reaches only git on this side."""
    repos = tmp_path / "repos"
    bare = make_repo(repos, "app", {"README.md": "hello\n", "src/app.py": "x = 1\n"})
    base = rev(bare, "main")
    password = "gitpw-" + uuid.uuid4().hex
    config = repo_config(tmp_path)
    set_secret(config.secrets_path, TENANT, "gh", password)
    store = await open_store(f"file://{tmp_path / 'results'}")
    tag = marker()
    harness.fake.script(
        match=tag,
        replies=[
            ToolUse.read("README.md"),
            ToolUse.edit("README.md", "hello", "goodbye"),
            ToolUse.write("docs/new.md", "new\n"),
            Text("changed two files"),
        ],
    )
    async with (
        GitHttpServer(repos, user="x-access-token", password=password) as server,
        harness.proxy(Credential("api_key", SECRET)) as proxy,
    ):
        executor = harness.executor(proxy, config=config, store=store)
        task_id, started = await harness.submit(
            f"Fix the greeting {tag}",
            repo={"url": f"{server.url}/app.git", "ref": "main", "credential": "gh"},
            output={"branch": "sandstream/fix", "push": True},
        )
        await executor.worker().run_until_idle()
        assert not (tmp_path / "workspaces" / task_id).exists()  # this side's copy is gone
        events = await harness.history(task_id)
        (end,) = ends(events)
        assert isinstance(end, ev.ExecutionCompleted), end
        branch = end.branch
        assert branch is not None and branch.pushed and branch.base == base
        assert branch.commit == rev(bare, "sandstream/fix")  # on the origin
        pushed = [e for e in events if isinstance(e, ev.BranchPushed)]
        assert [(p.branch, p.commit) for p in pushed] == [("sandstream/fix", branch.commit)]

        # A repeat (a redelivery after the push) makes the same commit and pushes nothing.
        receive_packs = sum(s.method == "POST" and "receive-pack" in s.path for s in server.seen)
        requested = next(e for e in events if isinstance(e, ev.TaskRequested))
        prepared = next(e for e in events if isinstance(e, ev.WorkspacePrepared))
        again, error = await executor.exchange.branch(started, requested.spec, prepared, pushed[0])
        assert error is None and again is not None and again.commit == branch.commit
        assert sum(s.method == "POST" and "receive-pack" in s.path for s in server.seen) == (
            receive_packs
        )
        await store.close()

    # Exactly the agent's change, one commit on top of the checked-out one, by the sandbox.
    assert git("rev-parse", f"{branch.commit}^", cwd=bare).strip() == base
    changed = git("diff", "--name-only", base, "sandstream/fix", cwd=bare).split()
    assert changed == ["README.md", "docs/new.md"]
    assert git("show", "sandstream/fix:README.md", cwd=bare) == "goodbye\n"
    author = git("log", "-1", "--format=%an <%ae>|%s", "sandstream/fix", cwd=bare).strip()
    assert author == "Sandstream <agent@sandstream.invalid>|Fix the greeting " + tag

    # The bundle: the same commit, with the checked-out one as its prerequisite.
    assert branch.bundle is not None and branch.bundle.key == f"tasks/{task_id}/changes.bundle"
    bundle = tmp_path / "results" / branch.bundle.key
    clone = tmp_path / "clone"
    git("clone", "-q", str(bare), str(clone))
    git("bundle", "verify", str(bundle), cwd=clone)
    git("fetch", "-q", str(bundle), "sandstream/fix:from-bundle", cwd=clone)
    assert rev(clone, "from-bundle") == branch.commit

    # The credential: only in the git processes of this side.
    for raw in await harness.raw_history():
        assert password.encode() not in raw
    inspect = await harness.driver.inspect(sandbox_name(task_id))
    assert password not in json.dumps(inspect)
    grep = await harness.driver.exec(
        sandbox_name(task_id), ["grep", "-rl", password, "/workspace", "/tmp"]
    )
    assert grep.output == b""
    assert password.encode() not in bundle.read_bytes()


async def test_a_refused_push_fails_the_task_and_keeps_the_runs_result(
    harness: Harness, tmp_path: Path
) -> None:
    """The origin's branch moved on (another commit there): the push is refused, never
    forced; the task fails with push_failed and keeps the run's diff, text and bundle."""
    repos = tmp_path / "repos"
    bare = make_repo(repos, "app", {"README.md": "hello\n"})
    git("update-ref", "refs/heads/taken", rev(bare, "main"), cwd=bare)  # a branch of its own
    store = await open_store(f"file://{tmp_path / 'results'}")
    tag = marker()
    harness.fake.script(match=tag, replies=[ToolUse.write("new.txt", "n\n"), Text("added")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path), store=store)
        task_id, _ = await harness.submit(
            f"add a file {tag}",
            repo={"url": f"file://{bare}", "ref": "v1"},  # the tag: one commit behind "taken"
            output={"branch": "taken", "push": True},
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    await store.close()
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed) and end.code == "push_failed", end
    assert "refused the branch 'taken'" in end.message and "rejected" in end.message
    assert end.text == "added" and "+n" in end.diff and end.files_changed == ["new.txt"]
    assert end.branch is not None and not end.branch.pushed and end.branch.commit
    assert end.branch.bundle is not None
    assert rev(bare, "taken") == rev(bare, "main")  # untouched
    assert not any(isinstance(e, ev.BranchPushed) for e in events)


async def test_a_prepared_workspace_is_never_filled_again(harness: Harness, tmp_path: Path) -> None:
    """Once WorkspacePrepared is in the history (the agent may have started on it), a
    redelivered message does not fetch or copy anything again."""
    repos = tmp_path / "repos"
    make_repo(repos, "app", {"README.md": "hello\n"})
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("nothing to do")])
    async with (
        GitHttpServer(repos) as server,
        harness.proxy(Credential("api_key", SECRET)) as proxy,
    ):
        executor = harness.executor(proxy, config=repo_config(tmp_path))
        task_id, started = await harness.submit(
            f"look {tag}",
            repo={"url": f"{server.url}/app.git"},
            setup="echo mine > agents-own.txt",
            publish_started=False,
        )
        await harness.bus.publish(
            ev.WorkspacePrepared(
                event_id=ev.event_id(task_id, "WorkspacePrepared"),
                task_id=task_id,
                tenant=TENANT,
                url=f"{server.url}/app.git",
                ref="main",
                commit="0" * 40,
            )
        )
        await harness.bus.publish(started)
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    assert server.seen == []  # not even a look at the repository
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    listing = await harness.driver.exec(sandbox_name(task_id), ["ls", "-A", "/workspace"])
    assert listing.output.split() == [b"agents-own.txt"]


async def stored_files(store: BlobStore, files: list[tuple[str, bytes, int]]) -> dict[str, object]:
    """What the gateway does with a task's files: one tar in the store; the spec's reference."""
    archive = inputs.pack(files)
    obj = await store.put(inputs.input_key(sha256_hex(archive)), archive, "application/x-tar")
    return {"key": obj.key, "sha256": obj.sha256, "size": obj.size, "count": len(files)}


async def test_files_go_over_the_checkout_and_the_branch_holds_them_and_the_agents_change(
    harness: Harness, tmp_path: Path
) -> None:
    bare = make_repo(tmp_path / "repos", "app", {"README.md": "hello\n", "conf.ini": "a=1\n"})
    base = rev(bare, "main")
    store = await open_store(f"file://{tmp_path / 'results'}")
    files = await stored_files(
        store, [("conf.ini", b"a=2\n", 0o644), ("tools/check.sh", b"#!/bin/sh\necho ok\n", 0o755)]
    )
    tag = marker()
    harness.fake.script(
        match=tag,
        replies=[
            ToolUse.bash("cat conf.ini > /tmp/seen && tools/check.sh >> /tmp/seen"),
            ToolUse.write("added.txt", "by the agent\n"),
            Text("done"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path), store=store)
        task_id, _ = await harness.submit(
            f"use the files {tag}",
            repo={"url": f"file://{bare}"},
            files=files,
            output={"branch": "with-files"},
            allowed_tools=["Bash"],
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    await store.close()
    prepared = next(e for e in events if isinstance(e, ev.WorkspacePrepared))
    assert prepared.files == 2 and prepared.commit == base
    seen = await harness.driver.exec(sandbox_name(task_id), ["cat", "/tmp/seen"])
    assert seen.output == b"a=2\nok\n"  # the task's file over the repository's, executable
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.files_changed == ["added.txt"]  # the diff: what the agent did
    assert end.branch is not None and end.branch.commit and not end.branch.pushed
    # The branch: the workspace as the agent left it, files included, on top of the commit.
    clone = tmp_path / "clone"
    git("clone", "-q", str(bare), str(clone))
    git("fetch", "-q", str(tmp_path / "results" / f"tasks/{task_id}/changes.bundle"),
        "with-files:b", cwd=clone)  # fmt: skip
    changed = git("diff", "--name-status", base, "b", cwd=clone).split("\n")
    assert changed[:3] == ["A\tadded.txt", "M\tconf.ini", "A\ttools/check.sh"]
    assert git("ls-tree", "b", "tools/check.sh", cwd=clone).startswith("100755 ")


async def test_a_file_through_a_link_of_the_repository_is_refused(
    harness: Harness, tmp_path: Path
) -> None:
    work = tmp_path / "linked"
    git("init", "-q", "-b", "main", str(work))
    (work / "etc").symlink_to("/etc")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "a link out", cwd=work)
    store = await open_store(f"file://{tmp_path / 'results'}")
    files = await stored_files(store, [("ok.txt", b"x", 0o644), ("etc/cron.d/x", b"y", 0o644)])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path), store=store)
        task_id, _ = await harness.submit("never runs", repo={"url": f"file://{work}"}, files=files)
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    await store.close()
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed) and end.code == "workspace_error"
    assert "files[1].path 'etc/cron.d/x' goes through 'etc', a link" in end.message
    assert not any(isinstance(e, ev.ExecutionStarted) for e in events)


async def test_artifacts_are_the_matching_files_and_never_what_a_link_points_at(
    harness: Harness, tmp_path: Path
) -> None:
    store = await open_store(f"file://{tmp_path / 'results'}")
    tag = marker()
    harness.fake.script(
        match=tag,
        replies=[
            ToolUse.bash(
                "mkdir -p dist/sub logs && echo js > dist/app.js && echo map > dist/sub/x.map "
                "&& echo log > logs/run.log && echo no > keep-out.txt "
                "&& ln -s /etc/passwd dist/passwd && ln -s /proc/self dist/self "
                "&& ln -s /etc logs/etc"
            ),
            Text("built"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, store=store)
        task_id, _ = await harness.submit(
            f"build {tag}",
            output={"artifacts": ["dist/*", "*.log", "logs/etc/*"]},
            allowed_tools=["Bash"],
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    await store.close()
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.artifacts is not None and end.artifacts.object is not None
    assert sorted(end.artifacts.files) == ["dist/app.js", "dist/sub/x.map", "logs/run.log"]
    archive = tmp_path / "results" / end.artifacts.object.key
    assert end.artifacts.object.key == f"tasks/{task_id}/artifacts.tar.gz"
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["dist/app.js", "dist/sub/x.map", "logs/run.log"]
        assert all(m.isfile() for m in members.values())
        extracted = tar.extractfile("dist/app.js")
        assert extracted is not None and extracted.read() == b"js\n"


# ---- egress --------------------------------------------------------------------------------


async def test_the_agent_reaches_allowed_hosts_through_the_proxy_and_nothing_else(
    harness: Harness,
) -> None:
    """From inside the sandbox (network none), curl through HTTP_PROXY: the allowed name
    (pinned to a server on this machine's loopback) answers, plain and through a CONNECT
    tunnel; another name, a redirect to it, and the raw address are refused; the refusals are
    events and the result's network lists both."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {request.host}")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://other.test:{request.url.port}/hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/redirect", redirect)
    async with serving(app) as port:
        code = "curl -s -o /dev/null -w '%{http_code}\\n'"
        script = (
            f"curl -s http://allowed.test:{port}/hello > /tmp/seen; echo >> /tmp/seen; "
            f"{code} -p http://allowed.test:{port}/hello >> /tmp/seen; "
            f"{code} http://other.test:{port}/hello >> /tmp/seen; "
            f"{code} -L http://allowed.test:{port}/redirect >> /tmp/seen; "
            f"{code} http://127.0.0.1:{port}/hello --noproxy '' >> /tmp/seen; "
            f"curl -s -m 5 http://127.0.0.1:{port}/hello --noproxy '*' >> /tmp/seen; "
            "echo $? >> /tmp/seen"
        )
        tag = marker()
        # The model's last turn waits for a refusal to show on the bus: they are published as
        # they happen, not only at the end of the run.
        release = asyncio.Event()
        harness.fake.script(
            match=tag, replies=[ToolUse.bash(script), Reply(Text("fetched"), hold=release)]
        )
        pins = parse_pins(f"allowed.test=127.0.0.1:{port},other.test=127.0.0.1:{port}")
        async with harness.proxy(Credential("api_key", SECRET), pins=pins) as proxy:
            executor = harness.executor(proxy)
            task_id, _ = await harness.submit(
                f"fetch {tag}",
                network={"allow": [f"allowed.test:{port}"]},
                allowed_tools=["Bash"],
            )

            async def release_on_refusal() -> None:
                await wait_for_event(harness.bus, task_id, "EgressBlocked", timeout=60)
                release.set()

            waiter = asyncio.create_task(release_on_refusal())
            await executor.worker().run_until_idle()
            await waiter
            events = await harness.history(task_id)
    seen = await harness.driver.exec(sandbox_name(task_id), ["cat", "/tmp/seen"])
    assert seen.output.decode().splitlines() == [
        f"hello from allowed.test:{port}",
        "200",  # through a CONNECT tunnel (-p)
        "403",  # another name
        "403",  # the redirect to it: followed by curl, refused by the proxy
        "403",  # the raw address, through the proxy
        "7",  # and straight, bypassing the proxy: no network at all (curl: cannot connect)
    ]
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.network is not None
    assert [(a.host, a.requests) for a in end.network.allowed] == [("allowed.test", 3)]
    blocked = {(b.host, b.port): b.count for b in end.network.blocked}
    assert blocked == {("other.test", port): 2, ("127.0.0.1", port): 1}
    # One event per refused host and port, as soon as it was seen (count: by then).
    events_blocked = [e for e in events if isinstance(e, ev.EgressBlocked)]
    assert sorted(e.host for e in events_blocked) == ["127.0.0.1", "other.test"]
    assert all(e.count >= 1 and e.port == port for e in events_blocked)
    first_refusal = min(events.index(e) for e in events_blocked)
    assert first_refusal < events.index(end)  # during the run, not only at its end


async def test_the_clis_own_web_fetch_goes_through_the_policy_with_the_installations_ca(
    harness: Harness, tmp_path: Path
) -> None:
    """WebFetch (https only: the CLI upgrades http) of an allowed name reaches an origin whose
    certificate only the installation's CA vouches for; another name is refused; curl trusts
    the same CA; the CLI's domain preflight to api.anthropic.com is never attempted."""
    cert, key = self_signed(tmp_path, "docs.test")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    page, agents = f"PAGE-{uuid.uuid4().hex}", []

    async def docs(request: web.Request) -> web.Response:
        agents.append(request.headers.get("User-Agent", ""))
        html = f"<html><body><h1>{page}</h1></body></html>"
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/guide", docs)
    async with serving(app, tls) as port:
        tag = marker()
        harness.fake.script(
            match=tag,
            replies=[
                ToolUse("ToolSearch", {"query": "select:WebFetch", "max_results": 1}),
                ToolUse(
                    "WebFetch", {"url": f"https://docs.test:{port}/guide", "prompt": "summary"}
                ),
                ToolUse(
                    "WebFetch", {"url": f"https://other.test:{port}/guide", "prompt": "summary"}
                ),
                ToolUse.bash(f"curl -sS https://docs.test:{port}/guide > /tmp/curl-seen 2>&1"),
                Text("read"),
            ],
        )
        pins = parse_pins(f"docs.test=127.0.0.1:{port},other.test=127.0.0.1:{port}")
        config = ExecutorConfig(sandbox_ca=cert.read_bytes())
        async with harness.proxy(Credential("api_key", SECRET), pins=pins) as proxy:
            executor = harness.executor(proxy, config=config)
            task_id, _ = await harness.submit(
                f"read the guide {tag}",
                network={"allow": [f"docs.test:{port}"]},
                allowed_tools=["WebFetch", "Bash"],
            )
            await executor.worker().run_until_idle()
            events = await harness.history(task_id)
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    # The CLI fetched the page itself and handed it to the model (its summarising request).
    assert agents[0].startswith("Claude-User (claude-code/")
    assert any(page in json.dumps(r.body) for r in harness.fake.requests)
    seen = await harness.driver.exec(sandbox_name(task_id), ["cat", "/tmp/curl-seen"])
    assert page in seen.output.decode()  # curl verified the origin with the same CA
    assert len(agents) == 2
    assert end.network is not None
    assert [(a.host, a.requests) for a in end.network.allowed] == [("docs.test", 2)]
    assert [(b.host, b.port) for b in end.network.blocked] == [("other.test", port)]
    # The refusal reached the model as the tool's error ("proxy refused the connection").
    refused = json.loads(requests_of(harness.fake, tag)[3])["messages"][-1]["content"][0]
    assert refused["type"] == "tool_result" and refused["is_error"], refused


async def test_what_the_agent_leaves_running_is_stopped_before_its_changes_are_collected(
    harness: Harness,
) -> None:
    """A detached writer outlives the CLI: it is stopped as the run ends, the changes are
    collected whole, and nothing of the agent's user runs in the sandbox afterwards."""
    tag = marker()
    writer = "setsid nohup bash -c 'while :; do date +%s%N >> ticker; sleep 0.01; done' "
    harness.fake.script(
        match=tag,
        replies=[ToolUse.bash(f"{writer} >/dev/null 2>&1 & sleep 0.3; echo started"), Text("ok")],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"leave a writer {tag}", allowed_tools=["Bash"])
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.files_changed == ["ticker"]
    name = sandbox_name(task_id)
    left = await harness.driver.exec(
        name, ["bash", "-c", "grep -ls '[d]ate +%s' /proc/[0-9]*/cmdline; true"]
    )
    assert left.output == b""  # the writer is gone
    lines = end.diff.count("\n+")
    again = await harness.driver.exec(name, ["wc", "-l", "/workspace/ticker"])
    assert int(again.output.split()[0]) <= lines  # the file stopped growing at the end


# ---- agent configuration and honest outcomes -------------------------------------------------


def requests_of(fake: FakeModel, tag: str) -> list[str]:
    """The bodies of the main model requests of the conversation with ``tag``, as JSON text."""
    return [json.dumps(r.body) for r in fake.main_requests() if tag in (r.prompt or "")]


async def test_each_option_reaches_the_cli_where_it_belongs(harness: Harness) -> None:
    tag, appended, memory = marker(), "ALWAYS-ANSWER-IN-HAIKU " + marker(), "MEMO " + marker()
    harness.fake.script(match=tag, replies=[ToolUse.bash("echo allowed > /tmp/ran"), Text("ok")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(
            f"configured {tag}",
            agent={
                "append_system_prompt": appended,
                "claude_md": memory,
                # Bash allowed by the run's settings file, not by allowed_tools
                "settings": {"permissions": {"allow": ["Bash"]}},
                "mcp_servers": {"local": {"command": "/bin/true", "args": ["x"]}},
            },
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    bodies = requests_of(harness.fake, tag)
    assert bodies and all(appended in b for b in bodies)  # the system prompt, every turn
    assert any(memory in b for b in bodies)  # CLAUDE.md as the user's memory
    name = sandbox_name(task_id)
    ran = await harness.driver.exec(name, ["cat", "/tmp/ran"])
    assert ran.output == b"allowed\n"
    mcp = await harness.driver.exec(name, ["cat", f"{agent.CONFIG_DIR}/{agent.MCP_FILE}"])
    assert json.loads(mcp.output) == {
        "mcpServers": {"local": {"type": "stdio", "command": "/bin/true", "args": ["x"], "env": {}}}
    }
    assert end.files_changed == []  # none of it is in the workspace
    assert end.warnings == []


async def test_a_disallowed_tool_is_not_offered_to_the_model(harness: Harness) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("fine")])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"tools {tag}", agent={"disallowed_tools": ["Write"]})
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))
    assert isinstance(end, ev.ExecutionCompleted), end
    offered = [
        {t.get("name") for t in r.body.get("tools") or []}
        for r in harness.fake.main_requests()
        if tag in (r.prompt or "")
    ]
    assert offered and all("Write" not in names and "Read" in names for names in offered)


async def test_a_denied_call_is_a_warning_or_with_fail_on_permission_denial_a_failure(
    harness: Harness,
) -> None:
    outcomes = []
    for strict in (False, True):
        tag = marker()
        # Bash is not allowed under acceptEdits: the call is denied, the run goes on.
        harness.fake.script(
            match=tag, replies=[ToolUse.bash("python3 -c 'print(1)'"), Text("could not")]
        )
        async with harness.proxy(Credential("api_key", SECRET)) as proxy:
            executor = harness.executor(proxy)
            agent_config = {"fail_on_permission_denial": True} if strict else None
            task_id, _ = await harness.submit(f"run {tag}", agent=agent_config)
            await executor.worker().run_until_idle()
            (end,) = ends(await harness.history(task_id))
        outcomes.append(end)
    lenient, strict_end = outcomes
    assert isinstance(lenient, ev.ExecutionCompleted) and lenient.warnings == ["permission_denied"]
    assert isinstance(strict_end, ev.ExecutionFailed) and strict_end.code == "permission_denied"
    assert "Bash" in strict_end.message and strict_end.warnings == ["permission_denied"]


async def test_a_stalled_model_ends_the_run_as_stalled(harness: Harness) -> None:
    tag = marker()
    never = asyncio.Event()
    harness.fake.script(match=tag, replies=[Reply(Text("too late"), hold=never, pings=False)])
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, started = await harness.submit(f"stall {tag}", agent={"stall_timeout_s": 10})
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    never.set()
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionFailed) and end.code == "stalled", end
    elapsed = (end.at - started.at).total_seconds()
    assert 10 <= elapsed < 30, elapsed
    print(f"\nstalled after {elapsed:.1f} s (stall_timeout_s 10)")


async def test_a_cli_that_does_not_exit_after_its_result_is_stopped_and_its_result_kept(
    harness: Harness,
) -> None:
    tag = marker()
    harness.fake.script(match=tag, replies=[Text("the answer")])
    # A SessionEnd hook that never ends: the CLI has printed its result and does not exit.
    hang = {
        "hooks": {"SessionEnd": [{"hooks": [{"type": "command", "command": "sleep 600"}]}]},
        # SessionEnd hooks get 1.5 s unless told otherwise: this one may take its time.
        "env": {"CLAUDE_CODE_SESSIONEND_HOOKS_TIMEOUT_MS": "600000"},
    }
    config = ExecutorConfig(result_exit_grace_s=3.0)
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=config)
        task_id, _ = await harness.submit(f"answer {tag}", agent={"settings": hang})
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.text == "the answer" and "stopped_after_result" in end.warnings


async def test_a_json_schema_gives_structured_output(harness: Harness) -> None:
    tag = marker()
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    harness.fake.script(
        match=tag, replies=[ToolUse("StructuredOutput", {"answer": 42}), Text("done")]
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy)
        task_id, _ = await harness.submit(f"answer {tag}", agent={"json_schema": schema})
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.structured_output == {"answer": 42}


# ---- follow-ups ------------------------------------------------------------------------------


async def test_the_run_packs_a_small_workspace_itself_and_a_large_one_is_packed_by_exec(
    harness: Harness, tmp_path: Path
) -> None:
    """What a follow-up starts from: a small workspace comes packed by the run as it ends (after
    its sweep, handed out by the keeper), a large one by an exec as before; a pack the agent
    planted where the run puts its own is never what is kept."""
    store = await open_store(f"file://{tmp_path / 'results'}")
    tag = marker()
    planted = f"printf junk >{agent.RUN_DIR}/keep; echo planted"
    harness.fake.script(
        match=tag, replies=[ToolUse.bash(planted), ToolUse.write("note.txt", "kept\n"), Text("ok")]
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, store=store)
        small, _ = await harness.submit(f"small {tag}", allowed_tools=["Bash"])
        large, _ = await harness.submit(
            f"large {tag}", setup="head -c 12000000 /dev/urandom >big.bin", allowed_tools=["Bash"]
        )
        with structlog.testing.capture_logs() as logged:
            await executor.worker().run_until_idle()
        ends_of = {t: ends(await harness.history(t)) for t in (small, large)}
    how = sorted(e["packed_by"] for e in logged if e["event"] == "workspace kept")
    assert how == ["exec", "run"]
    for task_id, (end,) in ends_of.items():
        assert isinstance(end, ev.ExecutionCompleted), end
        assert end.warnings == [], end.warnings
        kept = {o.key.rsplit("/", 1)[1]: o for o in end.kept}
        assert sorted(kept) == ["session.tar.gz", "workspace.tar.gz"]
        data = await store.get(kept["workspace.tar.gz"].key)
        assert data is not None and sha256_hex(data) == kept["workspace.tar.gz"].sha256
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
        # The small one: the agent's note, not its planted "pack"; the large one: the seed.
        assert names == (["./note.txt"] if task_id == small else ["./big.bin", "./note.txt"])
    await store.close()


async def test_a_follow_up_starts_from_the_earlier_workspace_and_goes_on_with_its_session(
    harness: Harness, tmp_path: Path
) -> None:
    """Step 1 writes a file; step 2 (follow_up) reads it: the file is there, and the model
    is sent step 1's conversation (the CLI resumed its session) with step 2's prompt."""
    store = await open_store(f"file://{tmp_path / 'results'}")
    one, two = marker(), marker()
    # One script for both steps: a resumed conversation goes on where step 1 stopped.
    harness.fake.script(
        match=one,
        replies=[
            ToolUse.write("notes.txt", "written in step one\n"),
            Text("step one done"),
            ToolUse.read("notes.txt"),
            Text("step two done"),
            Text("step three done"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, store=store)
        first, _ = await harness.submit(f"write notes {one}")
        await executor.worker().run_until_idle()
        (end_one,) = ends(await harness.history(first))
        assert isinstance(end_one, ev.ExecutionCompleted), end_one
        # An empty workspace before the run (recorded as git's empty tree, no git run): what
        # the agent wrote in it is the change.
        assert end_one.files_changed == ["notes.txt"] and "+written in step one" in end_one.diff
        assert sorted(o.key.rsplit("/", 1)[1] for o in end_one.kept) == [
            "session.tar.gz",
            "workspace.tar.gz",
        ]
        second, _ = await harness.submit(f"now read them {two}", follow_up=first)
        await executor.worker().run_until_idle()
        events_two = await harness.history(second)
        # A chain: a follow-up of the follow-up goes on with both earlier steps.
        third, _ = await harness.submit("and the third step", follow_up=second)
        await executor.worker().run_until_idle()
        (end_three,) = ends(await harness.history(third))
    await store.close()
    assert isinstance(end_three, ev.ExecutionCompleted), end_three
    assert end_three.text == "step three done"
    step_three = [
        json.dumps(r.body)
        for r in harness.fake.main_requests()
        if "and the third step" in json.dumps(r.body)
    ]
    assert step_three and all(one in b and two in b for b in step_three)
    (end_two,) = ends(events_two)
    assert isinstance(end_two, ev.ExecutionCompleted), end_two
    assert end_two.text == "step two done"
    prepared = next(e for e in events_two if isinstance(e, ev.WorkspacePrepared))
    assert prepared.resume == end_one.session_id
    assert end_two.session_id and end_two.files_changed == []  # it only read
    step_two = [
        json.dumps(r.body) for r in harness.fake.main_requests() if two in json.dumps(r.body)
    ]
    assert step_two, "the model never saw step two's prompt"
    assert any("written in step one" in body for body in step_two)  # it read step 1's file
    assert all("write notes" in body for body in step_two)  # with step 1's conversation
    listing = await harness.driver.exec(sandbox_name(second), ["cat", "/workspace/notes.txt"])
    assert listing.output == b"written in step one\n"


async def test_a_follow_up_of_another_tenants_task_is_refused(
    harness: Harness, tmp_path: Path
) -> None:
    store = await open_store(f"file://{tmp_path / 'results'}")
    other = ev.new_task_id()
    await harness.bus.publish(
        ev.TaskRequested(
            event_id=ev.event_id(other, "TaskRequested"),
            task_id=other,
            tenant="globex",
            spec=ev.TaskSpec(prompt="theirs"),
        )
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, store=store)
        task_id, _ = await harness.submit("mine", follow_up=other)
        await executor.worker().run_until_idle()
        (end,) = ends(await harness.history(task_id))
    await store.close()
    assert isinstance(end, ev.ExecutionFailed) and end.code == "workspace_error"
    assert f"no task {other} of this tenant" in end.message


# A stdio MCP server in bash (the image has no other interpreter): newline-delimited JSON-RPC,
# just enough of the protocol for the CLI to list and call one tool. The reply says who ran it.
MCP_PROBE = rb"""#!/bin/bash
reply() { printf '{"jsonrpc":"2.0","id":%s,"result":%s}\n' "$id" "$1"; }
field() { printf '%s' "$line" | sed -n "s/.*\"$1\":\"\\{0,1\\}\([^\",}]*\).*/\\1/p"; }
tool='{"name":"whoami","description":"Who runs this server","inputSchema":{"type":"object"}}'
while IFS= read -r line; do
  id=$(field id)
  case "$line" in
    *'"method":"initialize"'*)
      info='"capabilities":{"tools":{}},"serverInfo":{"name":"probe","version":"1"}'
      reply "{\"protocolVersion\":\"$(field protocolVersion)\",$info}" ;;
    *'"method":"tools/list"'*) reply "{\"tools\":[$tool]}" ;;
    *'"method":"tools/call"'*)
      text="probe-ran uid=$(id -u) token=$PROBE_TOKEN"
      reply "{\"content\":[{\"type\":\"text\",\"text\":\"$text\"}]}" ;;
    *) if [ -n "$id" ]; then reply '{}'; fi ;;
  esac
done
"""


async def test_a_stdio_mcp_server_runs_inside_the_sandbox_and_the_model_calls_its_tool(
    harness: Harness, tmp_path: Path
) -> None:
    store = await open_store(f"file://{tmp_path / 'results'}")
    files = await stored_files(store, [("tools/probe.sh", MCP_PROBE, 0o755)])
    tag, token = marker(), marker()
    harness.fake.script(
        match=tag,
        replies=[
            # MCP tools are deferred: the model loads the schema first, as a real one does.
            ToolUse("ToolSearch", {"query": "select:mcp__probe__whoami", "max_results": 1}),
            ToolUse("mcp__probe__whoami", {}),
            Text("the probe answered"),
        ],
    )
    async with harness.proxy(Credential("api_key", SECRET)) as proxy:
        executor = harness.executor(proxy, config=repo_config(tmp_path), store=store)
        task_id, _ = await harness.submit(
            f"ask the probe {tag}",
            files=files,
            allowed_tools=["mcp__probe__whoami"],
            agent={
                "mcp_servers": {
                    "probe": {"command": "/workspace/tools/probe.sh", "env": {"PROBE_TOKEN": token}}
                }
            },
        )
        await executor.worker().run_until_idle()
        events = await harness.history(task_id)
    await store.close()
    (end,) = ends(events)
    assert isinstance(end, ev.ExecutionCompleted), end
    assert end.warnings == []  # the call was allowed, not denied
    bodies = requests_of(harness.fake, tag)
    # The CLI started the server, listed its tool and offered it to the model ...
    assert len(bodies) == 3 and "mcp__probe__whoami" in bodies[0]
    assert "Who runs this server" in bodies[1]  # the schema, as the server described it
    # ... and the call ran in the sandbox, as the agent, with the configured environment.
    assert f"probe-ran uid=1000 token={token}" in bodies[-1]
