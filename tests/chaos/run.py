"""The chaos run: start the system from its parts, load it, kill its parts, then audit it.

1. start nats-server, the four services and the model proxy as processes of their own
   (:mod:`.system`), with the fake model in this process answering after small random delays;
2. submit the batch over HTTP with an ``Idempotency-Key`` per task, and follow every task
   as a client would (a third by SSE, a third by ``?wait`` long-polls, a third through the
   synchronous ``POST /execute``), reconnecting when cut;
3. meanwhile SIGKILL a random service every few seconds and restart it (every service at
   least once, the executor while agents run), restart nats-server once, and plant an orphan
   sandbox just before the lifecycle is killed (its restart must reap it);
4. once every accepted task has ended, check the stream, Docker and storage (:mod:`.audit`).

:func:`run` returns the :class:`~tests.chaos.audit.Report`; it never leaves a process or a
container of its own behind, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

from shared import events as ev
from shared.bus import Record
from shared.sandbox import POOL_PREFIX, sandbox_name
from tests.chaos import clients
from tests.chaos.audit import Kill, Report, audit, read_stream
from tests.chaos.clients import TaskRecord
from tests.chaos.system import NATS, S3, SERVICES, ContainerCreates, System
from tests.fakes.model import FakeModel, Reply, Text, ToolUse

API_KEY: Final = "sk-chaos-0123456789-secret"
MAX_REPLY_DELAY: Final = 0.6
WATCH_GRACE_S: Final = 30.0
"""How long clients get to see their task's end by themselves once the stream has it."""
ORPHAN_GRACE_S: Final = 15.0
AUDIT_S: Final = 100.0
SHUTDOWN_S: Final = 25.0
"""What :meth:`System.stop` may take: services 15 s (in parallel), then nats-server 10 s."""


@dataclass
class ChaosConfig:
    tasks: int = 60
    kill_every: float = 3.0
    """Mean seconds between kills (each pause is drawn from 0.6-1.4 times this)."""
    seed: int | None = None
    max_concurrent: int = 5
    timeout: float = 600.0
    """Bound on the whole run (at least 60 s); past it the run stops, audits what it has, and
    fails. Its last quarter (at most 100 s) is kept for the audit and the shutdown."""
    ack_wait: float = 4.0
    max_deliver: int = 8
    nats_restarts: int = 1
    storage: str = "s3"
    """Where results go: ``s3`` (moto's server, its own process, killed too) or ``file``."""
    targets: tuple[str, ...] | None = None
    """The parts that are killed (each at least once); by default the five services and,
    with S3 storage, the S3 server."""
    tenants: int = 2
    warm_pool: int = 2
    """``SANDSTREAM_WARM_POOL_SIZE``: tasks claim pool sandboxes while the lifecycle is killed."""
    task_timeout_s: int = 300
    submit_gap: float = 0.25
    keep: bool = False
    """Keep the run's folder (logs, data) even when it passes; it is always kept on failure."""
    say: Callable[[str], None] = print


@dataclass
class _Run:
    config: ChaosConfig
    rng: random.Random
    system: System
    fake: FakeModel
    records: list[TaskRecord]
    report: Report
    stop_kills: asyncio.Event = field(default_factory=asyncio.Event)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    orphan: str | None = None


async def run(config: ChaosConfig) -> Report:
    """One chaos run; see the module docstring. The report says whether it passed."""
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:8]
    instance = f"chaos-{run_id}"
    root = Path(tempfile.mkdtemp(prefix=f"sandstream-{instance}-"))
    tenants = [f"chaos-{chr(ord('a') + i)}" for i in range(max(1, config.tenants))]
    if config.targets is None:
        config.targets = (*SERVICES, S3) if config.storage == "s3" else SERVICES
    report = Report(
        run_id=run_id,
        seed=seed,
        root=root,
        tasks=config.tasks,
        nats_restarts_planned=config.nats_restarts,
        targets=config.targets,
    )
    began = time.monotonic()
    config.say(
        f"chaos {instance}: seed {seed}, {config.tasks} tasks, {config.storage} storage, "
        f"folder {root}"
    )
    async with FakeModel() as fake:
        records = _plan(config, rng, run_id, tenants, fake)
        system = System(
            root,
            instance=instance,
            model_url=fake.url,
            api_key=API_KEY,
            max_concurrent=config.max_concurrent,
            ack_wait_s=config.ack_wait,
            max_deliver=config.max_deliver,
            tenants=tenants,
            storage=config.storage,
            warm_pool=config.warm_pool,
        )
        creates = ContainerCreates(system.label)
        state = _Run(config, rng, system, fake, records, report)
        try:
            await creates.start()
            await system.start()
            config.say(f"system up in {time.monotonic() - began:.1f}s: {system.url}")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                # The audit and the shutdown get the last quarter (at most AUDIT_S) of --timeout.
                reserve = min(AUDIT_S, max(40.0, config.timeout / 4))
                try:
                    left = config.timeout - reserve - (time.monotonic() - began)
                    async with asyncio.timeout(max(1.0, left)):
                        await _chaos(state, http)
                except TimeoutError:
                    report.timed_out = True
                    config.say("chaos: the run hit its --timeout; auditing what there is")
                finally:
                    state.stop_kills.set()
                async with asyncio.timeout(reserve - SHUTDOWN_S):
                    await _settle(state, http)
                    wait = 0 if report.timed_out else ORPHAN_GRACE_S
                    report.orphans = await _orphans(system, wait, config.warm_pool)
                    await creates.stop()
                    report.container_creates = dict(creates.counts)
                    assert system.bus is not None
                    await audit(report, system.bus, records, fake, system.read_object, state.orphan)
        except Exception as exc:
            report.errors.append(f"the run itself failed: {type(exc).__name__}: {exc}")
            config.say(traceback.format_exc())
        finally:
            for watcher in state.watchers:
                watcher.cancel()
            await asyncio.gather(*state.watchers, return_exceptions=True)
            await system.stop()
            await creates.stop()
            with contextlib.suppress(Exception):
                await system.remove_containers()
            report.wall_s = time.monotonic() - began
            if report.passed and not config.keep:
                shutil.rmtree(root, ignore_errors=True)
    return report


def _plan(
    config: ChaosConfig, rng: random.Random, run_id: str, tenants: list[str], fake: FakeModel
) -> list[TaskRecord]:
    """The batch: a unique prompt per task, scripted to write one file then answer."""
    records = []
    for i in range(config.tasks):
        marker = f"[chaos-{run_id}-{i:04d}]"
        name = f"chaos-{i:04d}.txt"
        prompt = f"{marker} write the file {name} with the task's number, then say so."
        fake.script(
            [
                Reply(
                    ToolUse.write(name, f"task {i} of chaos run {run_id}\n"),
                    delay=rng.uniform(0.02, MAX_REPLY_DELAY),
                ),
                Reply(Text(f"wrote {name}"), delay=rng.uniform(0.02, MAX_REPLY_DELAY)),
            ],
            match=marker,
        )
        records.append(
            TaskRecord(
                index=i,
                tenant=tenants[i % len(tenants)],
                key=f"chaos-{run_id}-{i:04d}",
                marker=marker,
                prompt=prompt,
                file=name,
                watch=("sse", "wait", "execute")[i % 3],
            )
        )
    return records


# ---- the chaos phase -----------------------------------------------------------------------


async def _chaos(state: _Run, http: aiohttp.ClientSession) -> None:
    """Submit, follow and kill until every accepted task has a terminal event in the stream."""
    submitter = asyncio.create_task(_submit_all(state, http), name="chaos-submit")
    killer = asyncio.create_task(_kill_loop(state), name="chaos-kill")
    bus = state.system.bus
    assert bus is not None
    last_said = time.monotonic()
    try:
        while True:
            await asyncio.sleep(1.0)
            if killer.done():
                killer.result()  # a broken kill loop is a broken run: raise its error
            try:
                histories = await read_stream(bus, tries=1)
            except Exception:
                continue  # nats-server is being restarted
            accepted = [r.task_id for r in state.records if r.task_id]
            ended = sum(1 for t in accepted if _ended(histories.get(t, [])))
            if time.monotonic() - last_said >= 10:
                last_said = time.monotonic()
                state.config.say(
                    f"  {ended}/{len(accepted)} accepted tasks ended, "
                    f"{len(state.report.kills)} kills so far"
                )
            if submitter.done() and ended == len(accepted):
                submitter.result()
                return
    finally:
        state.stop_kills.set()
        for task in (submitter, killer):
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 30.0)
        # a part killed at the very end is restarted by the kill loop before it returns


def _ended(records: list[Record]) -> bool:
    return any(ev.is_terminal(r.event) for r in records)


async def _submit_all(state: _Run, http: aiohttp.ClientSession) -> None:
    system, cfg = state.system, state.config
    pending: set[asyncio.Task[None]] = set()

    async def one(rec: TaskRecord) -> None:
        body = {
            "prompt": rec.prompt,
            "timeout_s": cfg.task_timeout_s,
            "metadata": {"chaos": state.report.run_id, "index": str(rec.index)},
        }
        token = system.tokens[rec.tenant]
        if rec.watch == "execute":
            body["task"] = body.pop("prompt")
            await clients.execute(http, system.url, token, rec, body)
            return
        await clients.submit(http, system.url, token, rec, body)
        if rec.task_id is None:
            return
        follow = clients.watch_sse if rec.watch == "sse" else clients.watch_wait
        state.watchers.append(
            asyncio.create_task(follow(http, system.url, token, rec), name=f"watch-{rec.index}")
        )

    for rec in state.records:
        task = asyncio.create_task(one(rec), name=f"submit-{rec.index}")
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(cfg.submit_gap * state.rng.uniform(0.5, 1.5))
    await asyncio.gather(*pending)


def agents_active(fake: FakeModel) -> int:
    """CLI runs in the middle of their conversation with the model right now (an estimate).

    A run whose last request got the tool call has more to ask; one whose last request got
    the final text is still running while that reply is being delayed.
    """
    now = time.monotonic()
    latest = {r.conversation_id: r for r in fake.main_requests()}
    return sum(
        1
        for r in latest.values()
        if (r.reply_index == 0 and now - r.at < 30) or now - r.at < MAX_REPLY_DELAY + 0.3
    )


async def _kill_loop(state: _Run) -> None:
    """SIGKILL a part every few seconds and restart it; the mandatory kills come first."""
    cfg, rng, system = state.config, state.rng, state.system
    targets = cfg.targets or ()
    mandatory = [*targets, *([NATS] * cfg.nats_restarts)]
    rng.shuffle(mandatory)
    while True:
        with contextlib.suppress(TimeoutError):
            pause = cfg.kill_every * rng.uniform(0.6, 1.4)
            await asyncio.wait_for(state.stop_kills.wait(), pause)
        if state.stop_kills.is_set():
            return
        active = agents_active(state.fake)
        target = _choose(mandatory, targets, active, rng)
        if target is None:
            continue
        if target == "lifecycle" and state.orphan is None:
            state.orphan = await system.plant_orphan(ev.new_task_id())
        system.kill(target)
        state.report.kills.append(Kill(at=time.time(), target=target, agents_active=active))
        state.config.say(f"  SIGKILL {target} (agents mid-run: {active})")
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        await system.restart(target)


def _choose(
    mandatory: list[str], targets: tuple[str, ...], active: int, rng: random.Random
) -> str | None:
    """The next part to kill: the mandatory ones first (the executor only while agents run,
    and then before the others: its window is the narrowest)."""
    if "executor" in mandatory and active > 0:
        mandatory.remove("executor")
        return "executor"
    for target in mandatory:
        if target == "executor" and active == 0:
            continue
        mandatory.remove(target)
        return target
    if mandatory:
        return None  # only the executor is left, and no agent runs just now
    return rng.choice(targets) if targets else None


# ---- after the chaos -----------------------------------------------------------------------


async def _settle(state: _Run, http: aiohttp.ClientSession) -> None:
    """Let the clients finish by themselves; a client still waiting is stalled: reconnect it."""
    if state.watchers and not state.report.timed_out:
        await asyncio.wait(state.watchers, timeout=WATCH_GRACE_S)
    system = state.system
    for watcher in state.watchers:
        watcher.cancel()
    await asyncio.gather(*state.watchers, return_exceptions=True)
    state.watchers.clear()
    for rec in state.records:
        if rec.task_id is None or rec.watch_done:
            continue
        state.report.stalled.append(rec.task_id)
        if state.report.timed_out:
            continue
        follow = clients.watch_sse if rec.watch == "sse" else clients.watch_wait
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follow(http, system.url, system.tokens[rec.tenant], rec), 15)


async def _orphans(system: System, wait: float, pool: int) -> list[str]:
    """This run's containers still there after ``wait`` seconds of giving them time to go,
    but for the running lifecycle's warm pool (at most ``pool`` unclaimed sandboxes: those of
    killed lifecycles are reaped when the next one starts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        left = await system.containers()
        unclaimed = [name for name in left if name.startswith(sandbox_name(POOL_PREFIX))]
        if len(unclaimed) <= pool:
            left = [name for name in left if name not in unclaimed]
        if not left or loop.time() >= deadline:
            return left
        await asyncio.sleep(0.5)
