"""HTTP clients of the chaos run, each as patient as a well-behaved real client.

- :func:`submit` posts a task with its ``Idempotency-Key`` and retries the same request on
  ``503`` and on connection errors (the gateway may be the part being killed);
- :func:`watch_sse` follows ``/v1/tasks/{id}/events`` and reconnects with ``Last-Event-ID``
  until the terminal event; it records every sequence it saw, so gaps and repeats show;
- :func:`watch_wait` long-polls ``/v1/tasks/{id}?wait=`` until the status is terminal;
- :func:`execute` is the synchronous form: ``POST /execute`` with an ``Idempotency-Key``,
  asked again with the same key whenever the answer is cut off, until the result comes.

What each client saw is kept in its task's :class:`TaskRecord` and checked against the
stream at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from shared import events as ev

TERMINAL_TYPES: Final = frozenset(ev.type_name(t) for t in ev.TERMINAL_TYPES)
TERMINAL_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
RETRY_STATUSES: Final = frozenset({502, 503, 504})
NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=5)
SHORT: Final = aiohttp.ClientTimeout(total=10)


@dataclass
class TaskRecord:
    """One task of the batch: what was asked, and what the clients observed."""

    index: int
    tenant: str
    key: str
    marker: str
    prompt: str
    file: str
    watch: str  # "sse", "wait" or "execute"
    task_id: str | None = None
    submit_attempts: int = 0
    submit_error: str | None = None
    sse: list[tuple[int, str]] = field(default_factory=list)
    sse_repeats: int = 0
    reconnects: int = 0
    not_found: int = 0
    watch_status: str | None = None
    watch_done: bool = False
    watch_errors: list[str] = field(default_factory=list)
    result_status: str | None = None
    """``POST /execute`` only: the status of the result it answered with."""


async def _pause(attempt: int) -> None:
    await asyncio.sleep(min(2.0, 0.1 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))


async def submit(
    http: aiohttp.ClientSession, url: str, token: str, rec: TaskRecord, body: dict[str, Any]
) -> None:
    """POST the task until the gateway answers 200/202 (sets ``rec.task_id``) or refuses it."""
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": rec.key}
    while True:
        rec.submit_attempts += 1
        try:
            async with http.post(f"{url}/v1/tasks", json=body, headers=headers, timeout=SHORT) as r:
                if r.status in (200, 202):
                    rec.task_id = (await r.json())["task_id"]
                    return
                text = await r.text()
                if r.status not in RETRY_STATUSES:
                    rec.submit_error = f"HTTP {r.status}: {text[:300]}"
                    return
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            pass
        await _pause(rec.submit_attempts)


async def watch_sse(http: aiohttp.ClientSession, url: str, token: str, rec: TaskRecord) -> None:
    """Follow the task's SSE stream, reconnecting with ``Last-Event-ID``, to its end."""
    assert rec.task_id is not None
    attempt = 0
    while True:
        last = rec.sse[-1][0] if rec.sse else 0
        headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last)}
        try:
            async with http.get(
                f"{url}/v1/tasks/{rec.task_id}/events", headers=headers, timeout=NO_TIMEOUT
            ) as r:
                if r.status == 404:
                    rec.not_found += 1
                elif r.status == 200:
                    attempt = 0
                    if await _read_sse(r, rec):
                        rec.watch_status = rec.sse[-1][1]
                        rec.watch_done = True
                        return
                elif r.status not in RETRY_STATUSES:
                    rec.watch_errors.append(f"SSE HTTP {r.status}: {(await r.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        rec.reconnects += 1
        attempt += 1
        await _pause(attempt)


async def _read_sse(response: aiohttp.ClientResponse, rec: TaskRecord) -> bool:
    """Record the events of one connection; True once the terminal event has come."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
            continue
        if "id" not in fields:
            fields = {}
            continue  # a comment or keep-alive
        seq, kind = int(fields["id"]), fields.get("event", "")
        fields = {}
        if rec.sse and seq <= rec.sse[-1][0]:
            rec.sse_repeats += 1
            continue
        rec.sse.append((seq, kind))
        if kind in TERMINAL_TYPES:
            return True
    return False


async def watch_wait(http: aiohttp.ClientSession, url: str, token: str, rec: TaskRecord) -> None:
    """Long-poll ``GET /v1/tasks/{id}?wait=20`` until the task's status is terminal."""
    assert rec.task_id is not None
    headers = {"Authorization": f"Bearer {token}"}
    attempt = 0
    while True:
        try:
            async with http.get(
                f"{url}/v1/tasks/{rec.task_id}",
                params={"wait": "20"},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=40),
            ) as r:
                if r.status == 404:
                    rec.not_found += 1
                elif r.status == 200:
                    attempt = 0
                    status = (await r.json())["status"]
                    if status in TERMINAL_STATUSES:
                        rec.watch_status = status
                        rec.watch_done = True
                        return
                    continue  # the wait ran out: ask again at once
                elif r.status not in RETRY_STATUSES:
                    rec.watch_errors.append(f"wait HTTP {r.status}: {(await r.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        rec.reconnects += 1
        attempt += 1
        await _pause(attempt)


async def execute(
    http: aiohttp.ClientSession, url: str, token: str, rec: TaskRecord, body: dict[str, Any]
) -> None:
    """``POST /execute`` until it answers with the task's end (sets ``rec.task_id``)."""
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": rec.key}
    while True:
        rec.submit_attempts += 1
        try:
            async with http.post(
                f"{url}/execute", json=body, headers=headers, timeout=NO_TIMEOUT
            ) as r:
                if r.status == 200:
                    answer = await r.json()
                    rec.task_id = answer["task_id"]
                    rec.watch_status = answer["status"]
                    rec.result_status = (answer.get("result") or {}).get("status")
                    rec.watch_done = True
                    return
                text = await r.text()
                if r.status not in RETRY_STATUSES:
                    rec.submit_error = f"HTTP {r.status}: {text[:300]}"
                    return
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            pass
        rec.reconnects += 1
        await _pause(rec.submit_attempts)
