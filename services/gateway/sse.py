"""``GET /v1/tasks/{id}/events``: a task's history, then its live events, as Server-Sent Events.

``id:`` is the stream sequence, so ``Last-Event-ID`` resumes exactly after the last event a
client saw. The stream ends after the task's terminal event (or, with ``?follow=false``, once
the history is sent).
"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from services.gateway import params
from services.gateway.keys import BUS_LINK, LIMITS, PROJECTION
from services.gateway.routes import authenticate, find_task
from shared import events as ev
from shared.bus import Bus, Record
from shared.state import TaskState

_encoder = msgspec.json.Encoder()
routes = web.RouteTableDef()
KEEPALIVE_S = 15.0
SSE_AHEAD = 16


@routes.get("/v1/tasks/{task_id}/events")
async def task_events(request: web.Request) -> web.StreamResponse:
    tenant = authenticate(request)
    task_id = request.match_info["task_id"]
    task = await find_task(request, tenant, task_id)
    after = params.last_event_id(request)
    follow = params.follow(request)
    bus = request.app[BUS_LINK].require()
    if after > request.app[PROJECTION].last_seq:
        # An id past the end of the stream (a client's guess, or a replica ahead of ours):
        # resume from the end, so the task's next events, its terminal one included, still
        # arrive, and a finished task's stream ends at once.
        after = min(after, await bus.last_sequence())
    with request.app[LIMITS].stream(tenant):
        return await _send(request, bus, task, after, follow)


async def _send(
    request: web.Request, bus: Bus, task: TaskState, after: int, follow: bool
) -> web.StreamResponse:
    """The stream itself: the task's events after ``after``, live too when ``follow``."""
    task_id = task.task_id
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    records = bus.read(
        bus.task_filter(task_id), from_seq=after + 1, follow=follow and not task.status.terminal
    )
    # Bounded: a client that does not read holds up its own read of the stream, nothing else.
    queue: asyncio.Queue[Record | None] = asyncio.Queue(SSE_AHEAD)

    async def pump() -> None:
        try:
            async for record in records:
                await queue.put(record)
        except Exception:  # a failed read only ends this stream: the client resumes
            pass
        await queue.put(None)  # the read ended (history only, or an error)

    reader = asyncio.create_task(pump())
    try:
        while True:
            try:
                record = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                # A comment line: keeps proxies and load balancers from closing an idle stream.
                await response.write(b": keep-alive\n\n")
                continue
            if record is None:
                break
            name = ev.type_name(type(record.event))
            data = _encoder.encode(record.event).decode()
            await response.write(f"id: {record.seq}\nevent: {name}\ndata: {data}\n\n".encode())
            if ev.is_terminal(record.event):
                break
    finally:
        reader.cancel()
        # A failed read only ends this stream: the client resumes with Last-Event-ID.
        await asyncio.gather(reader, return_exceptions=True)
    await response.write_eof()
    return response
