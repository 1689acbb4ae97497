"""Client sub-commands: ``submit``, ``status``, ``events`` (over HTTP) and ``replay`` (NATS)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from shared import events as ev
from shared import settings as settings_mod
from shared.bus import Bus, NatsAuth, StreamSettings, connect, record_json_line
from shared.errors import Unavailable
from shared.identities import seed_path

if TYPE_CHECKING:  # imported where used: `replay` (NATS only) starts without it
    import aiohttp

REPLAY_BUFFER = 64 * 1024
"""Bytes of ``replay --json`` lines written at once."""


def summary(event: ev.AnyEvent) -> str:
    """A few words on what an event says, for the readable timeline."""
    match event:
        case ev.TaskRequested():
            prompt = event.spec.prompt.replace("\n", " ")
            return f"prompt={prompt[:60]!r}" + ("…" if len(prompt) > 60 else "")
        case ev.SandboxStarted():
            return f"sandbox={event.sandbox} image={event.image}"
        case ev.AgentOutput():
            kinds = []
            for line in event.lines:
                try:
                    kinds.append(str(json.loads(line).get("type", "?")))
                except ValueError:
                    kinds.append("text")
            return f"{len(event.lines)} line(s): {', '.join(kinds)}"
        case ev.ExecutionCompleted():
            return (
                f"exit={event.exit_code} turns={event.num_turns} "
                f"cost=${event.total_cost_usd:.4f} files={event.files_changed}"
            )
        case ev.ExecutionFailed():
            return f"{event.code}: {event.message}"
        case ev.SandboxStopped():
            u = event.usage
            return (
                f"{event.reason}: cpu={u.cpu_seconds:.2f}s "
                f"mem={u.memory_peak_bytes / 2**20:.0f}MiB wall={u.wall_ms}ms"
            )
        case ev.ResultStored():
            return f"{event.status} → {event.location}"
        case ev.TaskFailed():
            return f"{event.error.code}: {event.error.message}"
        case ev.TaskCancelled() | ev.TaskCancelRequested():
            return event.reason
        case ev.TaskTimedOut():
            return f"after {event.timeout_s}s"
    return ""


class Timeline:
    """Prints events as ``+elapsed  #seq  Type  summary``, elapsed from each task's first event."""

    def __init__(self) -> None:
        self.first: dict[str, datetime] = {}

    def line(self, seq: int, event: ev.AnyEvent, *, with_task: bool = False) -> str:
        start = self.first.setdefault(event.task_id, event.at)
        elapsed = (event.at - start).total_seconds()
        task = f"{event.task_id}  " if with_task else ""
        name = ev.type_name(type(event))
        stamp = f"+{elapsed:.3f}s"
        return f"{stamp:>10}  #{seq:<6} {task}{name:<20} {summary(event)}".rstrip()


# ---- replay (reads the stream directly) --------------------------------------------------


async def replay(args: argparse.Namespace) -> int:
    config = settings_mod.load()
    auth = NatsAuth.of(config)
    if auth.nkey is None and auth.creds is None:
        # By default, the read-only identity of the local `sandstream up`.
        local = seed_path(config.data_dir / "nats", "reader")
        auth = NatsAuth(nkey=local if local.is_file() else None)
    try:
        nc = await connect(
            config.nats_url, name="sandstream-replay", auth=auth, connect_timeout=2.0
        )
    except Unavailable as exc:
        print(
            f"sandstream: {exc} (set SANDSTREAM_NATS_URL, and SANDSTREAM_NATS_NKEY or "
            "SANDSTREAM_NATS_CREDS)",
            file=sys.stderr,
        )
        return 1
    bus = Bus(nc, StreamSettings.of(config))
    timeline = Timeline()
    try:
        subject = bus.task_filter(args.task_id) if args.task_id else bus.all_filter
        if args.event_type:
            subject = bus.subject(args.task_id or "*", args.event_type)
        out, pending = sys.stdout.buffer, bytearray()
        async for record in bus.read(subject, from_seq=args.from_seq, since=args.since):
            if args.json:
                pending += record_json_line(record)
                if len(pending) >= REPLAY_BUFFER:
                    out.write(pending)
                    pending.clear()
            else:
                print(timeline.line(record.seq, record.event, with_task=not args.task_id))
        out.write(pending)
    finally:
        await nc.close()
    return 0


# ---- HTTP commands -----------------------------------------------------------------------


def _headers() -> dict[str, str]:
    token = os.environ.get("SANDSTREAM_TOKEN")
    if not token:
        raise SystemExit("sandstream: set SANDSTREAM_TOKEN (`sandstream up` prints one)")
    return {"Authorization": f"Bearer {token}"}


def _url() -> str:
    return os.environ.get("SANDSTREAM_URL", "http://127.0.0.1:8080").rstrip("/")


async def _check(response: aiohttp.ClientResponse) -> Any:
    body = await response.json(content_type=None)
    if response.status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code, message = error.get("code", ""), error.get("message", body)
        raise SystemExit(f"sandstream: HTTP {response.status} {code}: {message}")
    return body


async def sse(
    session: aiohttp.ClientSession, url: str, last_event_id: int | None = None
) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """Yield ``(id, event, data)`` from a Server-Sent Events stream until it ends."""
    headers = _headers()
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    import aiohttp

    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as r:
        if r.status >= 400:
            await _check(r)
        fields: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                yield (
                    int(fields.get("id", "0")),
                    fields.get("event", ""),
                    json.loads(fields["data"]),
                )
            fields = {}


async def _follow(session: aiohttp.ClientSession, task_id: str) -> None:
    timeline = Timeline()
    url = f"{_url()}/v1/tasks/{task_id}/events"
    async for seq, _, data in sse(session, url):
        event = msgspec.convert(data, ev.AnyEvent)
        print(timeline.line(seq, event), flush=True)


async def run(args: argparse.Namespace) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        if args.command == "submit":
            body: dict[str, Any] = {"prompt": args.prompt}
            if args.timeout_s is not None:
                body["timeout_s"] = args.timeout_s
            if args.follow_up:
                body["follow_up"] = args.follow_up
            headers = _headers()
            if args.idempotency_key:
                headers["Idempotency-Key"] = args.idempotency_key
            async with session.post(f"{_url()}/v1/tasks", json=body, headers=headers) as r:
                accepted = await _check(r)
            task_id = accepted["task_id"]
            if not args.wait:
                print(json.dumps(accepted) if args.json else task_id)
                return 0
            print(f"task {task_id}", file=sys.stderr)
            await _follow(session, task_id)
            return await _show(session, task_id, as_json=args.json)
        if args.command == "tasks":
            url = f"{_url()}/v1/tasks?limit={args.limit}"
            async with session.get(url, headers=_headers()) as r:
                page = await _check(r)
            for task in page["tasks"]:
                if args.json:
                    print(json.dumps(task))
                else:
                    print(f"{task['task_id']}  {task['status']:<10} {task['created_at']}")
            return 0
        if args.command == "status":
            return await _show(session, args.task_id, as_json=args.json)
        if args.command == "events":
            if args.follow:
                await _follow(session, args.task_id)
            else:
                timeline = Timeline()
                url = f"{_url()}/v1/tasks/{args.task_id}/events?follow=false"
                async for seq, _, data in sse(session, url):
                    print(timeline.line(seq, msgspec.convert(data, ev.AnyEvent)))
            return 0
    raise SystemExit(f"sandstream: unknown command {args.command}")


async def _show(session: aiohttp.ClientSession, task_id: str, *, as_json: bool) -> int:
    async with session.get(f"{_url()}/v1/tasks/{task_id}", headers=_headers()) as r:
        task = await _check(r)
    if as_json:
        print(json.dumps(task, indent=2))
    else:
        print(f"{task['task_id']}  {task['status']}  created {task['created_at']}")
        if task.get("error"):
            print(f"error: {task['error']['code']}: {task['error']['message']}")
        result = task.get("result") or {}
        if result.get("text"):
            print(result["text"])
    return 0 if task["status"] in ("queued", "starting", "running", "storing", "succeeded") else 1
