"""The audit after a chaos run: the stream, Docker and storage against what must be true.

Everything is read back from the parts themselves: the whole ``TASKS`` stream (``Bus.read``),
the ``docker events`` creates of the run's containers and the containers left, the stored
objects (from the folder, or over HTTP from the S3 server: not through the code under test),
and the fake model's count of agent runs per prompt. Each broken rule becomes one line of
:attr:`Report.errors`; the run passes when there is none.

Every task is expected to succeed: the fake model never fails and every part comes back, so
a task that ends otherwise (with its reason) is a finding too, not a tolerated outcome.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from shared import events as ev
from shared.blobstore import sha256_hex
from shared.bus import Bus, Record
from shared.errors import Unavailable
from shared.results import decode_result
from shared.sandbox import sandbox_name
from shared.state import Status, fold
from tests.chaos.clients import TaskRecord
from tests.chaos.rules import violations
from tests.chaos.system import NATS, S3, SERVICES
from tests.fakes.model import FakeModel

ReadObject = Callable[[str], Awaitable[bytes | None]]
"""Reads a stored object by its key, as the store the run used has it (``None``: missing)."""


@dataclass
class Kill:
    at: float
    """Wall-clock time of the SIGKILL."""
    target: str
    agents_active: int
    """Agent runs mid-conversation with the model at that moment (the fake model's view)."""
    mid_run: int = 0
    """Tasks between ``ExecutionStarted`` and their execution's end then (the stream's view)."""


@dataclass
class Report:
    run_id: str
    seed: int
    root: Path
    tasks: int
    nats_restarts_planned: int = 1
    targets: tuple[str, ...] = SERVICES
    kills: list[Kill] = field(default_factory=list)
    timed_out: bool = False
    accepted: int = 0
    submit_retries: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicates: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    planted_orphan: str | None = None
    stalled: list[str] = field(default_factory=list)
    container_creates: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    not_found: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.errors

    def kills_of(self, target: str) -> list[Kill]:
        return [k for k in self.kills if k.target == target]

    def summary(self) -> str:
        """The figures of the run, then every error (at most 40 lines of them)."""
        verdict = "PASS" if self.passed else f"FAIL ({len(self.errors)} problems)"
        parts = (*SERVICES, S3) if S3 in self.targets else SERVICES
        per_service = ", ".join(f"{s} {len(self.kills_of(s))}" for s in parts)
        executor_mid = sum(1 for k in self.kills_of("executor") if k.mid_run)
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "none"
        if self.planted_orphan is None:
            planted = "no orphan planted"
        elif self.planted_orphan in self.orphans:
            planted = "the planted orphan was NOT reaped"
        else:
            planted = "the planted orphan was reaped"
        dups = ", ".join(f"{k} {n}" for k, n in sorted(self.duplicates.items()) if n)
        lines = [
            f"chaos run {self.run_id} (seed {self.seed}): {verdict}",
            f"  tasks        {self.tasks} submitted, {self.accepted} accepted "
            f"({self.submit_retries} requests retried); {statuses}; {self.events} events",
            f"  kills        {per_service} (executor with agents mid-run: {executor_mid})",
            f"  restarts     {sum(len(self.kills_of(s)) for s in parts)} restarts of those, "
            f"{len(self.kills_of(NATS))} nats-server restart(s)",
            f"  lost         {len(self.lost)}",
            f"  duplicates   {sum(self.duplicates.values())}" + (f" ({dups})" if dups else ""),
            f"  containers   {sum(self.container_creates.values())} created "
            f"(planted orphan included), {len(self.orphans)} left at the end ({planted})",
            f"  violations   {len(self.violations)} of the state machine",
            f"  clients      {self.reconnects} reconnects, {len(self.stalled)} stalled, "
            f"{self.not_found} answers of 404 for accepted tasks",
            f"  wall time    {self.wall_s:.1f} s" + ("  (hit --timeout)" if self.timed_out else ""),
        ]
        lines += [f"  ! {e}" for e in self.errors[:40]]
        if len(self.errors) > 40:
            lines.append(f"  ! ... and {len(self.errors) - 40} more")
        if not self.passed:
            lines.append(f"  logs and data kept in {self.root}")
        return "\n".join(lines)


async def read_stream(bus: Bus, tries: int = 5) -> dict[str, list[Record]]:
    """The whole stream grouped by task, checked to reach the stream's last sequence."""
    for _ in range(tries):
        last = await bus.last_sequence()
        records = [r async for r in bus.read()]
        if (records[-1].seq if records else 0) >= last:
            grouped: dict[str, list[Record]] = defaultdict(list)
            for record in records:
                grouped[record.event.task_id].append(record)
            return dict(grouped)
    raise Unavailable("reading the whole stream kept coming back short")


async def audit(
    report: Report,
    bus: Bus,
    records: list[TaskRecord],
    fake: FakeModel,
    read_object: ReadObject,
    planted_orphan: str | None,
) -> None:
    """Fill ``report`` with the figures and errors of the run (see the module docstring)."""
    report.planted_orphan = planted_orphan
    histories = await read_stream(bus)
    report.events = sum(len(h) for h in histories.values())
    accepted = {r.task_id: r for r in records if r.task_id is not None}
    report.accepted = len(accepted)
    report.submit_retries = sum(max(0, r.submit_attempts - 1) for r in records)
    report.reconnects = sum(r.reconnects for r in records)
    report.not_found = sum(r.not_found for r in records)
    err = report.errors.append

    for rec in records:
        if rec.task_id is None:
            err(f"task {rec.index} was not accepted: {rec.submit_error or 'no answer'}")
    unanswered = {r.key for r in records if r.task_id is None}
    for task_id in sorted(set(histories) - set(accepted)):
        first = histories[task_id][0].event
        if isinstance(first, ev.TaskRequested) and first.idempotency_key in unanswered:
            continue  # its client gave up waiting for the answer (reported above)
        report.duplicates["tasks nobody accepted"] += 1
        err(f"{task_id}: in the stream, but no submission got it as its answer")
    keys = Counter(
        e.event.idempotency_key
        for h in histories.values()
        for e in h
        if isinstance(e.event, ev.TaskRequested)
    )
    for key, n in keys.items():
        if n > 1:
            report.duplicates["tasks per idempotency key"] += n - 1
            err(f"Idempotency-Key {key}: {n} tasks")

    for task_id, rec in accepted.items():
        await _audit_task(report, task_id, rec, histories.get(task_id, []), fake, read_object)

    _audit_kills(report, histories)
    if report.orphans:
        err(f"containers left at the end: {', '.join(report.orphans)}")
    if report.not_found:
        err(f"the gateway answered 404 {report.not_found} times for tasks it had accepted")
    if report.stalled:
        err(f"clients still waiting {len(report.stalled)} tasks after they ended: {report.stalled}")
    if report.timed_out:
        err("the run did not finish within --timeout")


async def _audit_task(
    report: Report,
    task_id: str,
    rec: TaskRecord,
    history: list[Record],
    fake: FakeModel,
    read_object: ReadObject,
) -> None:
    err = report.errors.append
    events = [r.event for r in history]
    name = f"{task_id} (#{rec.index})"
    report.violations += [f"{name}: {v}" for v in violations(events)]
    for v in violations(events):
        err(f"{name}: state machine: {v}")
    state = fold(events)
    status = state.status if state is not None else None
    report.statuses[status.value if status is not None else "missing"] += 1
    terminals = [e for e in events if ev.is_terminal(e)]
    results = [e for e in events if isinstance(e, ev.ResultStored)]
    if not terminals:
        report.lost.append(task_id)
        err(f"{name}: lost: no terminal event (last: {_types(events)[-3:]})")
    if len(terminals) > 1:
        report.duplicates["terminal events"] += len(terminals) - 1
    if len(results) > 1:
        report.duplicates["results stored"] += len(results) - 1
    if status is Status.SUCCEEDED and not results:
        report.lost.append(task_id)
        err(f"{name}: succeeded without a stored result")
    elif status is not None and status is not Status.SUCCEEDED:
        reason = f"{state.error.code}: {state.error.message}" if state and state.error else "?"
        err(f"{name}: ended {status.value}: {reason[:300]}")

    for stored in results:
        for obj in stored.objects:
            data = await read_object(obj.key)
            if data is None:
                err(f"{name}: stored object {obj.key} is missing")
            elif sha256_hex(data) != obj.sha256 or len(data) != obj.size:
                err(f"{name}: stored object {obj.key} does not match its sha256/size")
            elif obj.key.endswith("/result.json") and status is Status.SUCCEEDED:
                result = decode_result(data)
                if result.files_changed != [rec.file] or result.text != f"wrote {rec.file}":
                    err(f"{name}: result.json has {result.files_changed} / {result.text!r}")
                if result.sandbox.wall_ms <= 0 or result.sandbox.cpu_seconds <= 0:
                    err(f"{name}: result.json lost the sandbox's usage: {result.sandbox}")

    runs = fake.conversations_matching(rec.marker)
    if runs > 1:
        report.duplicates["agent runs"] += runs - 1
        err(f"{name}: {runs} agent runs")
    elif status is Status.SUCCEEDED and runs != 1:
        err(f"{name}: succeeded with {runs} agent runs")

    creates = report.container_creates.get(sandbox_name(task_id), 0)
    if creates > 1:
        report.duplicates["containers"] += creates - 1
        err(f"{name}: {creates} containers were created")
    elif creates == 0 and any(isinstance(e, ev.SandboxStarted) for e in events):
        err(f"{name}: has SandboxStarted but no container create was seen")

    _audit_client(report, name, rec, history, status)


def _audit_client(
    report: Report, name: str, rec: TaskRecord, history: list[Record], status: Status | None
) -> None:
    """What the client saw must be what the stream holds: nothing lost, nothing twice."""
    err = report.errors.append
    if rec.watch_errors:
        err(f"{name}: client errors {rec.watch_errors[:3]}")
    if rec.watch == "sse":
        expected = []
        for record in history:
            expected.append((record.seq, ev.type_name(type(record.event))))
            if ev.is_terminal(record.event):
                break
        if rec.sse != expected:
            err(f"{name}: the SSE client saw {_short(rec.sse)}, the stream has {_short(expected)}")
        if rec.sse_repeats:
            err(f"{name}: the SSE client was sent {rec.sse_repeats} events it already had")
    elif rec.watch_status != (status.value if status else None):
        err(f"{name}: {rec.watch} answered {rec.watch_status}, the stream says {status}")
    elif rec.watch == "execute" and rec.result_status != rec.watch_status:
        err(f"{name}: /execute answered {rec.watch_status} with a {rec.result_status} result")


def _audit_kills(report: Report, histories: dict[str, list[Record]]) -> None:
    """How many agents were mid-run at each kill, and whether every part was hit."""
    spans: list[tuple[datetime, datetime]] = []
    for history in histories.values():
        began = next(
            (r.stored_at for r in history if isinstance(r.event, ev.ExecutionStarted)), None
        )
        ended = next(
            (
                r.stored_at
                for r in history
                if isinstance(r.event, ev.ExecutionCompleted | ev.ExecutionFailed)
            ),
            None,
        )
        if began is not None:
            spans.append((began, ended or datetime.max.replace(tzinfo=UTC)))
    for kill in report.kills:
        at = datetime.fromtimestamp(kill.at, UTC)
        kill.mid_run = sum(1 for began, ended in spans if began <= at < ended)
    for target in report.targets:
        if not report.kills_of(target):
            report.errors.append(f"{target} was never killed")
    if len(report.kills_of(NATS)) != report.nats_restarts_planned:
        report.errors.append(
            f"nats-server restarted {len(report.kills_of(NATS))} times, "
            f"not {report.nats_restarts_planned}"
        )
    if "executor" in report.targets and not any(k.mid_run for k in report.kills_of("executor")):
        report.errors.append("the executor was never killed while an agent was running")


def _types(events: list[ev.AnyEvent]) -> list[str]:
    return [ev.type_name(type(e)) for e in events]


def _short(seen: list[tuple[int, str]]) -> str:
    return msgspec.json.encode([f"{s}:{t}" for s, t in seen]).decode()
