"""The executor: on ``SandboxStarted``, run the agent in the task's sandbox and report it.

One handler (:meth:`Executor.handle`) per ``SandboxStarted`` message, run by a durable
:class:`~shared.worker.Worker` (consumer ``executor``). Events it publishes (docs/flow.md):

- ``ExecutionStarted`` (``<task>:ExecutionStarted:<attempt>``): the claim of the run;
- ``AgentOutput`` (``<task>:AgentOutput:<first line index>``): the CLI's stream-json lines in
  batches of at most ``batch_lines`` lines, ``batch_interval_s`` seconds or ``max_event_bytes``;
- exactly one of ``ExecutionCompleted`` / ``ExecutionFailed``
  (``<task>:ExecutionEnded:<attempt>``).

Crash safety: the run's lock lives in the sandbox (see ``agent.py``). A redelivered message
(a restarted executor, a lost ack) re-attaches: it follows the output file from the line after
the last published ``AgentOutput`` and collects the result when the run ends. Event ids are
deterministic, so whatever was published twice is dropped by the stream.

Outcomes: ``ExecutionCompleted`` only when the CLI exited 0 and said ``is_error: false``;
otherwise ``ExecutionFailed`` with ``no_credential`` (checked before anything runs),
``cli_error``, ``timeout`` (the executor's own backstop, a little after the task's deadline),
``oom``, ``sandbox_lost`` (the sandbox vanished while the task was not yet ended: when the
task already ended, e.g. the lifecycle timed it out or cancelled it, nothing is published),
or ``internal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets as secrets_mod
import ssl
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from services.executor import agent, verdict
from services.executor.exchange import Exchange
from services.executor.workspace import (
    Fetcher,
    WorkspaceError,
)
from services.modelproxy.control import ModelSockets
from services.modelproxy.policy import Budget
from services.modelproxy.proxy import TaskUsage
from shared import events as ev
from shared import launch
from shared.blobstore import BlobStore
from shared.bus import Bus
from shared.errors import Retry
from shared.sandbox import (
    LABEL_POOL,
    SandboxDriver,
    SandboxError,
    SandboxNotFound,
    sandbox_name,
)
from shared.settings import Settings
from shared.state import TaskState, fold
from shared.worker import Delivery, Worker

log = structlog.get_logger("sandstream.executor")

DURABLE: Final = "executor"
WATCH_S: Final = 1.0
"""How often the run's clocks (stall, exit after the result) are looked at."""
MAX_HOSTS: Final = 256
"""Hosts listed in a run's ``network`` (and ``EgressBlocked`` events) at most."""
KiB: Final = 1024

NO_CREDENTIAL_MESSAGE: Final = (
    "no model credential is configured: set ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN) "
    "in the model proxy's environment; only the model proxy uses it, and it never enters "
    "the sandbox"
)


class ExecutorConfig(msgspec.Struct, frozen=True, kw_only=True):
    cli_max_retries: int = agent.DEFAULT_MAX_RETRIES
    batch_lines: int = 1024
    """Lines per ``AgentOutput`` at most (with ``max_event_bytes`` and ``batch_interval_s``):
    at 64, an agent printing tiny lines cost one publish per 64 lines (16 MiB of 20-byte lines
    took ~80 s to reach the output cap)."""
    batch_interval_s: float = 0.1
    max_event_bytes: int = 256 * KiB
    max_line_bytes: int = 192 * KiB
    max_text_bytes: int = 128 * KiB
    max_denials_bytes: int = 64 * KiB
    max_diff_bytes: int = agent.MAX_DIFF_BYTES
    max_output_bytes: int = 16 * 1024 * KiB
    """Output kept per task (``SANDSTREAM_MAX_OUTPUT_BYTES``); past it the run is stopped."""
    queue_lines: int = 256
    """Lines read ahead of publishing; past it the exec stream is not read (backpressure)."""
    deadline_grace_s: float = 5.0
    """The executor stops the agent this long after the task's deadline (the lifecycle's
    deadline normally ends the task first)."""
    result_exit_grace_s: float = 10.0
    """A CLI that printed its result and has not exited this long after is stopped (its
    result is kept)."""

    workspaces_dir: Path = Path(".sandstream/workspaces")
    """Scratch space for repositories while they are fetched (one 0700 folder per task)."""
    secrets_path: Path = Path(".sandstream/secrets")
    max_repo_bytes: int = 1024 * 1024 * KiB
    repo_timeout_s: float = 300.0
    allow_file_repos: bool = False
    max_artifacts_bytes: int = 100 * 1024 * KiB
    """``artifacts.tar.gz`` at most (compressed)."""
    sandbox_ca: bytes | None = None
    """Certificates (PEM) sandboxes with ``network`` trust besides the image's: a mirror's or
    an inspecting proxy's CA (``SANDSTREAM_SANDBOX_CA_FILE``)."""

    @classmethod
    def of(cls, settings: Settings) -> ExecutorConfig:
        """The configuration the settings ask for."""
        return cls(
            max_output_bytes=settings.max_output_bytes,
            workspaces_dir=settings.workspaces_dir,
            secrets_path=settings.secrets_path,
            max_repo_bytes=settings.max_repo_bytes,
            repo_timeout_s=settings.repo_timeout_s,
            allow_file_repos=settings.allow_file_repos,
            sandbox_ca=_certificates(settings.sandbox_ca_file),
        )


def _certificates(path: Path | None) -> bytes | None:
    """The PEM file's bytes, checked: a file that is not certificates stops the executor at
    start with a message naming the setting, not every task with a TLS error later."""
    if path is None:
        return None
    name = "SANDSTREAM_SANDBOX_CA_FILE"
    try:
        with path.open("rb") as f:
            pem = f.read(agent.MAX_CA_BYTES + 1)
    except OSError as exc:
        raise SystemExit(f"{name}: {path} cannot be read: {exc.strerror}") from None
    if len(pem) > agent.MAX_CA_BYTES:
        raise SystemExit(f"{name}: {path} is larger than {agent.MAX_CA_BYTES} bytes")
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        raise SystemExit(f"{name}: {path} holds no PEM certificates: {exc}") from None
    return pem


class _History(msgspec.Struct, frozen=True, kw_only=True):
    """What the executor reads of a task: its history without output, and the last batch."""

    state: TaskState | None
    requested: ev.TaskRequested | None
    last_output: ev.AgentOutput | None
    prepared: ev.WorkspacePrepared | None = None
    pushed: ev.BranchPushed | None = None

    @property
    def over(self) -> bool:
        """The execution ended, or the whole task did: nothing is left to run or follow."""
        return self.state is not None and (self.state.status.terminal or self.state.execution_ended)


class _Outcome(msgspec.Struct, kw_only=True):
    collected: agent.Collected | None = None
    """``None``: the follow stream ended without the closing block (sandbox gone?)."""
    timed_out: bool = False
    output_limited: bool = False
    stalled: bool = False
    stopped_after_result: bool = False
    stderr: str = ""
    keeping: asyncio.Task[tuple[list[ev.StoredObject], list[str]]] | None = None
    """The workspace and session being kept, begun as soon as the agent's processes were
    stopped, while the keeper collects the run's changes."""


_END: Final = object()


class Executor:
    """Runs agents for ``SandboxStarted`` events. Dependencies come in as arguments."""

    def __init__(
        self,
        *,
        bus: Bus,
        driver: SandboxDriver,
        proxy: ModelSockets,
        config: ExecutorConfig | None = None,
        fetcher: Fetcher | None = None,
        store: BlobStore | None = None,
    ) -> None:
        self.bus = bus
        self.driver = driver
        self.proxy = proxy
        self.config = config or ExecutorConfig()
        self.store = store
        self.fetcher = fetcher or Fetcher(
            root=self.config.workspaces_dir,
            secrets_path=self.config.secrets_path,
            max_bytes=self.config.max_repo_bytes,
            timeout_s=self.config.repo_timeout_s,
            allow_file=self.config.allow_file_repos,
        )
        self._script = agent.wrapper_script(max_diff_bytes=self.config.max_diff_bytes)
        self.exchange = Exchange(
            bus=bus,
            driver=driver,
            store=store,
            fetcher=self.fetcher,
            script=self._script,
            max_artifacts_bytes=self.config.max_artifacts_bytes,
            ca=self.config.sandbox_ca,
        )

    def worker(
        self,
        *,
        durable: str = DURABLE,
        concurrency: int = 8,
        ack_wait: float = 10.0,
        max_deliver: int = 8,
    ) -> Worker:
        """The durable consumer feeding :meth:`handle` (``<prefix>.*.SandboxStarted``)."""
        return Worker(
            bus=self.bus,
            durable=durable,
            subjects=[f"{self.bus.prefix}.*.SandboxStarted"],
            handler=self.handle,
            on_give_up=self.on_give_up,
            concurrency=concurrency,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        )

    # ---- handler ----------------------------------------------------------------------------
    async def handle(self, event: ev.AnyEvent, delivery: Delivery) -> None:
        """Run (or re-attach to) the agent of one sandbox; publish its output and its end.

        Raises :class:`~shared.errors.Unavailable` / :class:`Retry` for transient trouble
        (NATS or Docker unreachable, the output stream cut while the sandbox lives): the
        message comes back and the next delivery re-attaches.
        """
        if not isinstance(event, ev.SandboxStarted):
            return
        began = time.perf_counter()
        history = await self._history(event.task_id)
        if history.over:
            log.info("execution already over, skipped")
            return
        requested = history.requested
        if requested is None:
            raise Retry("the task's TaskRequested is not readable yet")
        if await self.proxy.credential_kind() is None:
            await self._fail(event, "no_credential", NO_CREDENTIAL_MESSAGE)
            log.warning("execution failed", code="no_credential")
            return
        spec = requested.spec
        needed = bool(spec.repo or spec.files or spec.follow_up or self.exchange.config_files(spec))
        if needed and history.state is not None and not history.state.workspace_prepared:
            try:
                await self.exchange.prepare(event, spec)
            except WorkspaceError as exc:
                await self._fail(event, "workspace_error", str(exc))
                log.warning("execution failed", code="workspace_error", message=str(exc))
                return
        outcome = await self._execute(event, requested, history)
        log.info(
            "execution ended",
            outcome=outcome,
            ms=round((time.perf_counter() - began) * 1000, 1),
            delivery=delivery.num_delivered,
        )

    async def on_give_up(self, event: ev.AnyEvent, reason: str) -> None:
        """After ``max_deliver``: end the execution as ``internal`` (the lifecycle cleans up)."""
        if not isinstance(event, ev.SandboxStarted):
            return
        await self._fail(event, "internal", f"the executor gave up on this task: {reason}")
        await self.proxy.remove_task(event.task_id)

    # ---- steps ------------------------------------------------------------------------------
    async def _history(self, task_id: str) -> _History:
        events, last = await asyncio.gather(
            self.bus.history(task_id, types=ev.WITHOUT_OUTPUT),
            self.bus.last(task_id, "AgentOutput"),
        )
        output = last.event if last is not None and isinstance(last.event, ev.AgentOutput) else None
        requested = events[0] if events and isinstance(events[0], ev.TaskRequested) else None
        return _History(
            state=fold([*events, output] if output is not None else events),
            requested=requested,
            last_output=output,
            prepared=next((e for e in events if isinstance(e, ev.WorkspacePrepared)), None),
            pushed=next((e for e in events if isinstance(e, ev.BranchPushed)), None),
        )

    async def _execute(
        self, event: ev.SandboxStarted, requested: ev.TaskRequested, history: _History
    ) -> str:
        task_id, cfg = event.task_id, self.config
        name = sandbox_name(task_id)  # never the event's own field: derived from the id
        spec = requested.spec
        transcript = agent.Transcript()
        next_line = next_batch = next_output_bytes = 0
        if history.state is not None:
            state = history.state
            next_line, next_batch, next_output_bytes = (
                state.next_line,
                state.next_batch,
                state.output_bytes,
            )
        if (last := history.last_output) is not None:
            transcript.feed_all(last.lines)  # the result line may already be published
        await self.bus.publish(
            ev.ExecutionStarted(
                event_id=ev.event_id(task_id, "ExecutionStarted", event.attempt),
                task_id=task_id,
                tenant=event.tenant,
                causation_id=event.event_id,
                sandbox=name,
                attempt=event.attempt,
            )
        )
        await self.proxy.add_task(
            task_id, Budget(max_tokens=spec.max_tokens, max_budget_usd=spec.max_budget_usd)
        )
        if spec.network is not None:
            await self.proxy.add_egress(task_id, spec.network.allow)
        log.info("following the agent", from_line=next_line)
        nonce = "sandstream-end-" + secrets_mod.token_hex(16)
        deadline = requested.at.timestamp() + spec.timeout_s + cfg.deadline_grace_s
        try:
            outcome = await self._follow(
                event,
                spec,
                nonce,
                transcript,
                next_line,
                next_batch,
                next_output_bytes,
                deadline,
            )
        except SandboxNotFound:
            outcome = _Outcome()
        except SandboxError as exc:
            if await self._sandbox_alive(name):
                raise
            log.info("exec refused by a stopped sandbox", error=str(exc))
            outcome = _Outcome()
        try:
            return await self._finish(event, spec, transcript, outcome)
        finally:
            if outcome.keeping is not None and not outcome.keeping.done():
                outcome.keeping.cancel()  # the run did not end here: a retry keeps it
                with contextlib.suppress(BaseException):
                    await outcome.keeping

    async def _follow(  # noqa: C901 (one read loop; to split with the executor refactor)
        self,
        event: ev.SandboxStarted,
        spec: ev.TaskSpec,
        nonce: str,
        transcript: agent.Transcript,
        next_line: int,
        next_batch: int,
        next_output_bytes: int,
        deadline: float,
    ) -> _Outcome:
        """Start the run if nobody has, and stream its output into ``AgentOutput`` batches
        until the keeper's closing block (see ``agent.py``)."""
        cfg = self.config
        name = sandbox_name(event.task_id)
        outcome = _Outcome()
        # Bounded: while publishing lags, the exec stream is left unread, and the agent's
        # writes block in its own sandbox rather than in this process's memory.
        queue: asyncio.Queue[object] = asyncio.Queue(cfg.queue_lines)
        (env, argv), warm = await asyncio.gather(
            self._start_command(event.task_id, spec), self._from_the_pool(name)
        )
        stream = await self.driver.exec_stream(
            name,
            # A warm sandbox's launcher takes the start from the keeper: no exec for it.
            agent.follow_argv(
                self._script, from_line=next_line, start=launch.request(env, argv) if warm else ()
            ),
            env=agent.keeper_environment(nonce),
            workdir=agent.KEEPER_DIR,  # the agent may take /workspace away from the keeper
            keeper=True,
        )

        async def read() -> None:
            # Not in a ``finally``: once cancelled, nobody takes from a full queue.
            try:
                async for raw in stream.lines():
                    await queue.put(raw.decode("utf-8", errors="replace"))
            except Exception as exc:  # handed to the consumer below, which re-raises it
                await queue.put(exc)
            await queue.put(_END)

        pending: list[str] = []
        pending_bytes = 0
        output_bytes = next_output_bytes
        first_at = 0.0
        line_no, batch_no = next_line, next_batch
        tail: list[str] | None = None
        ready, ended, done = nonce + ".ready", nonce + ".ended", nonce + ".done"
        launched = ready + ".launched"
        quiet, quiet_packed = nonce + ".quiet", nonce + ".quiet.packed"
        pack_begin, pack_end = nonce + ".pack", nonce + ".packed"
        run_packed = False  # the run packed the workspace itself: it comes after the block
        pack: list[str] | None = None
        pack_chars, pack_size, packed = 0, 0, None
        complete = False
        killer: asyncio.Task[Any] | None = None
        config = spec.agent or ev.AgentConfig()
        last_line_at = time.monotonic()  # the stall watchdog's clock (with the model's bytes)
        result_at: float | None = None  # when the CLI printed its result (it should exit)
        started = False
        refusals: set[str] = set()  # EgressBlocked ids published during the run

        async def flush() -> None:
            nonlocal pending, pending_bytes, batch_no
            if not pending:
                return
            first = line_no - len(pending)
            await self.bus.publish(
                ev.AgentOutput(
                    event_id=ev.event_id(event.task_id, "AgentOutput", first),
                    task_id=event.task_id,
                    tenant=event.tenant,
                    causation_id=event.event_id,
                    batch=batch_no,
                    lines=pending,
                    attempt=event.attempt,
                    output_bytes=output_bytes,
                    first_line=first,
                )
            )
            batch_no += 1
            pending, pending_bytes = [], 0

        def stop(why: str) -> asyncio.Task[Any]:
            log.warning("stopping the agent", why=why)
            return asyncio.create_task(
                asyncio.wait_for(self.driver.exec(name, agent.kill_argv(self._script)), 15.0)
            )

        async def watch() -> None:
            """The run's two clocks: a result and no exit, or nothing at all for too long;
            and the egress proxy's refusals, published as they happen."""
            nonlocal killer
            now = time.monotonic()
            if spec.network is not None:
                await self._network(event, refusals)
            if result_at is not None and now - result_at > cfg.result_exit_grace_s:
                outcome.stopped_after_result = True
                killer = stop("no exit after its result")
            elif now - last_line_at > config.stall_timeout_s:
                usage = await self.proxy.usage(event.task_id)
                model_idle = time.time() - usage.last_activity
                if model_idle > config.stall_timeout_s:
                    outcome.stalled = True
                    killer = stop("stalled")

        async def add(line: str) -> None:
            nonlocal pending_bytes, first_at, line_no, output_bytes, killer, last_line_at
            nonlocal result_at
            last_line_at = time.monotonic()
            if outcome.output_limited:
                return  # past the cap: read (to reach the end) but keep nothing
            kept = agent.truncate_line(line, cfg.max_line_bytes)
            size = len(kept.encode()) + 4
            if output_bytes + size > cfg.max_output_bytes:
                outcome.output_limited = True
                await flush()
                if killer is None:
                    killer = stop("output limit")
                return
            output_bytes += size
            transcript.feed(line)  # whole: the result line must parse even when kept cut
            if result_at is None and transcript.has_result:
                result_at = time.monotonic()
            line = kept
            if pending and pending_bytes + size > cfg.max_event_bytes - 1024:
                await flush()
            if not pending:
                first_at = time.monotonic()
            pending.append(line)
            pending_bytes += size
            line_no += 1
            # The run's first line goes out at once: a watcher sees the agent has started.
            if len(pending) >= cfg.batch_lines or line_no == 1:
                await flush()

        reader = asyncio.create_task(read(), name=f"exec-read-{event.task_id}")
        # The run is started while the keeper records the workspace: the start waits in the
        # sandbox for the keeper's word, and the keeper's "ready" line is when it is awaited.
        # A warm sandbox's launcher may take it: the exec is sent only if the keeper found none.
        starting = None if warm else asyncio.create_task(self._start(name, env, argv))
        try:
            async with stream:
                while True:
                    waits = [deadline - time.time(), WATCH_S] if killer is None else []
                    if pending:
                        waits.append(first_at + cfg.batch_interval_s - time.monotonic())
                    timeout = max(0.0, min(waits)) if waits else None
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        if pending and time.monotonic() >= first_at + cfg.batch_interval_s:
                            await flush()
                        if killer is None and time.time() >= deadline:
                            outcome.timed_out = True
                            killer = stop("past its deadline")
                        elif killer is None and tail is None and started:
                            await watch()
                        continue
                    if item is _END:
                        break
                    if isinstance(item, Exception):
                        raise item
                    assert isinstance(item, str)
                    if item in (ready, launched) and tail is None:
                        if item == launched:
                            log.info("agent run", how="launched")
                        else:
                            starting = starting or asyncio.create_task(self._start(name, env, argv))
                            await starting
                        started, last_line_at = True, time.monotonic()
                    elif item == quiet_packed and tail is None:
                        run_packed = True
                    elif item in (ended, quiet) and tail is None and outcome.keeping is None:
                        # Not waited for here: the keeper collects once the agent's processes
                        # are gone, and the workspace is packed meanwhile.
                        outcome.keeping = asyncio.create_task(
                            self._stop_and_keep(event, stop=item == ended)
                        )
                    elif tail is not None and not complete:
                        if item.endswith(done):
                            if head := item[: -len(done)]:
                                tail.append(head)  # a truncated diff has no final newline
                            complete = True
                            if not run_packed:
                                break
                        else:
                            tail.append(item)
                    elif complete:  # the run's packs, base64, after the block
                        head, _, size = item.rpartition(" ")
                        if head == pack_begin and size.isdigit():
                            pack, pack_size = [], int(size)
                        elif item == pack_end and pack is not None:
                            packed = agent.decode_packs(pack, pack_size)
                            break
                        elif pack is not None:
                            pack_chars += len(item)
                            if pack_chars > agent.RUN_PACK_MAX_CHARS:
                                pack = None  # more than the run packs: by exec after all
                            else:
                                pack.append(item)
                    elif item.endswith(nonce):
                        if head := item[: -len(nonce)]:
                            await add(head)  # the output's last line had no newline
                        await flush()
                        tail = []
                    else:
                        await add(item)
                await flush()
                outcome.stderr = stream.stderr.decode("utf-8", errors="replace")
            if run_packed and complete and outcome.keeping is None:
                # None (cut or not sent): packed by exec after all.
                outcome.keeping = asyncio.create_task(
                    self._stop_and_keep(event, stop=False, packed=packed)
                )
        except BaseException:
            if outcome.keeping is not None:
                outcome.keeping.cancel()  # a retry stops and keeps again
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if starting is not None:
                starting.cancel()  # the follow ended first (a retry starts it again)
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await starting
            if killer is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await killer
        if tail is not None and complete:
            outcome.collected = agent.parse_collected(tail, max_diff_bytes=cfg.max_diff_bytes)
        return outcome

    async def _start_command(
        self, task_id: str, spec: ev.TaskSpec
    ) -> tuple[dict[str, str], list[str]]:
        """The agent's environment and the start's argv (a follow-up resumes its session)."""
        cfg = self.config
        egress = agent.EGRESS_PORT if spec.network is not None else None
        resume = None
        if spec.follow_up is not None:
            prepared = (await self._history(task_id)).prepared
            resume = prepared.resume if prepared is not None else None
        env = agent.environment(
            max_retries=cfg.cli_max_retries,
            egress_port=egress,
            extra_ca=cfg.sandbox_ca is not None,
        )
        argv = agent.start_argv(self._script, spec, egress_port=egress, resume=resume or None)
        return env, argv

    async def _from_the_pool(self, name: str) -> bool:
        """Whether the sandbox was made for the warm pool (a launcher may wait in it): its
        engine label, set by the lifecycle, never an event's word."""
        data = await self.driver.inspect(name)
        labels = ((data or {}).get("Config") or {}).get("Labels") or {}
        return labels.get(LABEL_POOL) == "1"

    async def _start(self, name: str, env: dict[str, str], argv: list[str]) -> None:
        """Start the agent's run by exec (a no-op for a run already started: it re-attaches)."""
        started = await self.driver.exec(name, argv, env=env, workdir=agent.WORKSPACE)
        said = started.output.decode("utf-8", errors="replace").strip()
        if started.exit_code != 0:
            raise SandboxError(f"the agent's run could not be started: {said[-500:]}")
        log.info("agent run", how=said)

    async def _stop_and_keep(
        self, event: ev.SandboxStarted, *, stop: bool = True, packed: bytes | None = None
    ) -> tuple[list[ev.StoredObject], list[str]]:
        """Stop the agent's processes (unless the keeper saw none left), then keep the
        workspace and the session for a follow-up (``packed``: as the run packed them)."""
        if stop:
            await self._stop_all(sandbox_name(event.task_id))
        return await self.exchange.keep(event, packed)

    async def _stop_all(self, name: str) -> None:
        """The run has ended: stop every process of the agent's user before the keeper
        collects (``kill -KILL -1`` spares only the shell that sends it)."""
        with contextlib.suppress(SandboxError):
            await asyncio.wait_for(
                self.driver.exec(name, ["bash", "-c", "kill -KILL -1 2>/dev/null; true"]), 15.0
            )

    async def _finish(
        self,
        event: ev.SandboxStarted,
        spec: ev.TaskSpec,
        transcript: agent.Transcript,
        outcome: _Outcome,
    ) -> str:
        """Turn what the run left into the one end event; returns the outcome's name."""
        task_id, cfg = event.task_id, self.config
        name = sandbox_name(task_id)  # never the event's own field: derived from the id
        collected = outcome.collected
        if collected is None:
            if await self._sandbox_alive(name, settle_s=0.5):
                raise Retry("the agent's output stream ended early; re-attaching")
            history = await self._history(task_id)
            await self.proxy.remove_task(task_id)
            if history.over:
                return "sandbox removed after the task ended"
            await self._fail(
                event,
                "sandbox_lost",
                "the sandbox disappeared while the agent was running",
                transcript=transcript,
            )
            return "sandbox_lost"

        result = transcript.result()
        counted = await self.proxy.usage(task_id)
        exit_code = collected.exit_code
        oom = pids = 0
        stopped_after_result = outcome.stopped_after_result
        if not verdict.succeeded(collected, result, stopped_after_result=stopped_after_result):
            oom = collected.oom_kills or (exit_code in (137, None) and await self._oom_killed(name))
            pids = collected.pids_limit_hits or await self.driver.pids_limit_hits(name)
        facts = verdict.Facts(
            collected=collected,
            result=result,
            budget_exceeded=counted.budget_exceeded or "",
            output_limited=outcome.output_limited,
            timed_out=outcome.timed_out,
            oom_killed=bool(oom),
            pids_limit_hits=pids,
            timeout_s=spec.timeout_s,
            max_output_bytes=cfg.max_output_bytes,
            stalled=outcome.stalled,
            stall_timeout_s=(spec.agent or ev.AgentConfig()).stall_timeout_s,
            stopped_after_result=outcome.stopped_after_result,
            fail_on_permission_denial=spec.agent is not None
            and spec.agent.fail_on_permission_denial,
        )
        judged = verdict.judge(facts)
        warnings = verdict.warnings(facts)
        structured = result.structured_output
        if structured is not None and len(msgspec.json.encode(structured)) > cfg.max_text_bytes:
            structured = None  # the agent's to size: never larger than an event may be
            warnings.append("structured_output_too_large")
        branch: ev.BranchInfo | None = None
        artifacts: ev.ArtifactsInfo | None = None
        network = await self._network(event) if spec.network is not None else None
        if outcome.keeping is None:
            outcome.keeping = asyncio.create_task(self._stop_and_keep(event))
        kept, not_kept = await outcome.keeping
        warnings += not_kept
        output = spec.output
        if output is not None and output.artifacts:
            artifacts, failed = await self.exchange.artifacts(event, output.artifacts)
            judged = judged or failed
        if judged is None and spec.repo is not None and output is not None and output.branch:
            history = await self._history(task_id)
            branch, judged = await self.exchange.branch(
                event, spec, history.prepared, history.pushed
            )
        common: dict[str, Any] = {
            "branch": branch,
            "artifacts": artifacts,
            "network": network,
            "warnings": warnings,
            "structured_output": structured,
            "kept": kept,
            "event_id": ev.event_id(task_id, "ExecutionEnded", event.attempt),
            "task_id": task_id,
            "tenant": event.tenant,
            "causation_id": event.event_id,
            "attempt": event.attempt,
            "text": agent.truncate_line(result.text, cfg.max_text_bytes),
            "num_turns": result.num_turns,
            "total_cost_usd": result.total_cost_usd,
            "usage": result.usage,
            "session_id": result.session_id,
            "permission_denials": agent.bounded_denials(
                result.permission_denials, cfg.max_denials_bytes
            ),
            "duration_ms": result.duration_ms,
            "diff": collected.diff,
            "files_changed": collected.files_changed,
            "model_usage": _model_usage(counted),
        }
        end: ev.Event
        if judged is None:
            end = ev.ExecutionCompleted(**common, is_error=False, exit_code=0)
        else:
            code, message = judged
            end = ev.ExecutionFailed(**common, code=code, message=message, exit_code=exit_code)
        await self.bus.publish(end)
        await self.proxy.remove_task(task_id)
        self.fetcher.discard(task_id)
        return judged[0] if judged else "completed"

    async def _network(
        self, event: ev.SandboxStarted, published: set[str] | None = None
    ) -> ev.NetworkInfo:
        """What the egress proxy let through and refused; one ``EgressBlocked`` per refused
        host and port (its id is derived from them: a repeat publishes nothing new). Called
        while the run goes on too (refusals show as they happen), with the ids ``published``
        so far."""
        task_id = event.task_id
        published = set() if published is None else published
        counts = await self.proxy.egress_counts(task_id)
        for refused in counts.blocked[:MAX_HOSTS]:
            where = f"{refused.host}:{refused.port}"
            digest = hashlib.sha256(where.encode()).hexdigest()[:16]
            if digest in published:
                continue
            published.add(digest)
            await self.bus.publish(
                ev.EgressBlocked(
                    event_id=ev.event_id(task_id, "EgressBlocked", digest),
                    task_id=task_id,
                    tenant=event.tenant,
                    causation_id=event.event_id,
                    host=refused.host[:253],
                    port=refused.port,
                    reason=refused.reason[:200],
                    count=refused.count,
                )
            )
        return ev.NetworkInfo(
            allowed=[
                ev.HostTraffic(host=a.host[:253], requests=a.requests, bytes=a.bytes)
                for a in counts.allowed[:MAX_HOSTS]
            ],
            blocked=[
                ev.HostRefusals(host=b.host[:253], port=b.port, count=b.count)
                for b in counts.blocked[:MAX_HOSTS]
            ],
        )

    async def _fail(
        self,
        event: ev.SandboxStarted,
        code: str,
        message: str,
        *,
        transcript: agent.Transcript | None = None,
    ) -> None:
        extra: dict[str, Any] = {}
        if transcript is not None:
            result = transcript.result()
            extra = {
                "text": agent.truncate_line(result.text, self.config.max_text_bytes),
                "session_id": result.session_id,
            }
        await self.bus.publish(
            ev.ExecutionFailed(
                event_id=ev.event_id(event.task_id, "ExecutionEnded", event.attempt),
                task_id=event.task_id,
                tenant=event.tenant,
                causation_id=event.event_id,
                attempt=event.attempt,
                code=code,
                message=message,
                **extra,
            )
        )

    async def _sandbox_alive(self, name: str, *, settle_s: float = 0.0) -> bool:
        """Whether the sandbox runs; with ``settle_s``, a sandbox being killed or removed
        (whose exec streams end a moment before the engine says so) gets that long to stop."""
        loop = asyncio.get_running_loop()
        until = loop.time() + settle_s
        while True:
            data = await self.driver.inspect(name)
            alive = data is not None and bool((data.get("State") or {}).get("Running"))
            if not alive or loop.time() >= until:
                return alive
            await asyncio.sleep(0.05)

    async def _oom_killed(self, name: str) -> bool:
        data = await self.driver.inspect(name)
        return data is not None and bool((data.get("State") or {}).get("OOMKilled"))


def _model_usage(counted: TaskUsage) -> ev.ModelUsage:
    return ev.ModelUsage(
        requests=counted.requests,
        input_tokens=counted.input_tokens,
        output_tokens=counted.output_tokens,
        cache_creation_input_tokens=counted.cache_creation_input_tokens,
        cache_read_input_tokens=counted.cache_read_input_tokens,
        cost_usd=round(counted.cost_usd, 6),
    )
