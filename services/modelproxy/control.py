"""How the executor drives the model proxy in its other process: a small HTTP API on a
private Unix socket (``SANDSTREAM_PROXY_SOCKET``, mode 0600, never mounted into a sandbox).

- ``GET /health``: ``{"credential": "api_key" | "oauth" | null}``, never the value;
- ``PUT /tasks/{task_id}``: listen on the task's model socket (idempotent), ``204``; the
  body, if any, is the task's :class:`~.policy.Budget`;
- ``GET /tasks/{task_id}/usage``: the task's requests and tokens so far;
- ``PUT /tasks/{task_id}/egress``: open the task's egress socket; the body is its
  ``network.allow`` (a JSON list), ``204``, ``400`` naming a bad entry;
- ``GET /tasks/{task_id}/egress``: what the egress proxy let through and refused;
- ``DELETE /tasks/{task_id}``: stop listening, forget the task, ``204``.

Task ids are checked against the task id format before anything touches a path: ``400``
otherwise. :class:`ModelSockets` is what the executor needs; :class:`~.proxy.ModelProxy`
(in process, for tests) and :class:`ProxyClient` (over this socket) both provide it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Final, Protocol

import aiohttp
import msgspec
from aiohttp import web

from services.modelproxy.egress import EgressCounts
from services.modelproxy.policy import Budget
from services.modelproxy.proxy import ModelProxy, TaskUsage
from shared import events as ev
from shared.errors import Unavailable

PROXY_KEY: Final = web.AppKey("proxy", ModelProxy)
CALL_TIMEOUT_S: Final = 10.0
PROXY_WAIT_S: Final = 20.0
"""How long a call waits for a proxy that does not answer (one being restarted)."""


class ModelSockets(Protocol):
    """The executor's view of the model proxy."""

    async def credential_kind(self) -> str | None: ...

    async def add_task(self, task_id: str, budget: Budget | None = None) -> object: ...

    async def remove_task(self, task_id: str) -> None: ...

    async def usage(self, task_id: str) -> TaskUsage: ...

    async def add_egress(self, task_id: str, allow: list[str]) -> None: ...

    async def egress_counts(self, task_id: str) -> EgressCounts: ...


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not ev.is_task_id(task_id):
        raise web.HTTPBadRequest(text="not a task id", content_type="text/plain")
    return task_id


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"credential": await request.app[PROXY_KEY].credential_kind()})


async def _add(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    raw = await request.read()
    try:
        budget = msgspec.json.decode(raw, type=Budget) if raw else None
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(text=f"not a budget: {exc}", content_type="text/plain") from None
    try:
        await request.app[PROXY_KEY].add_task(task_id, budget)
    except (ValueError, OSError) as exc:
        return web.json_response({"error": str(exc)}, status=500)
    return web.Response(status=204)


async def _usage(request: web.Request) -> web.Response:
    usage = await request.app[PROXY_KEY].usage(_task_id(request))
    return web.json_response(usage.as_dict())


async def _add_egress(request: web.Request) -> web.Response:
    task_id = _task_id(request)
    try:
        allow = msgspec.json.decode(await request.read(), type=list[str])
        await request.app[PROXY_KEY].add_egress(task_id, allow)
    except ValueError as exc:  # msgspec.DecodeError is one
        raise web.HTTPBadRequest(text=str(exc), content_type="text/plain") from None
    except OSError as exc:
        return web.json_response({"error": str(exc)}, status=500)
    return web.Response(status=204)


async def _egress(request: web.Request) -> web.Response:
    counts = await request.app[PROXY_KEY].egress_counts(_task_id(request))
    return web.Response(body=msgspec.json.encode(counts), content_type="application/json")


async def _remove(request: web.Request) -> web.Response:
    await request.app[PROXY_KEY].remove_task(_task_id(request))
    return web.Response(status=204)


def control_app(proxy: ModelProxy) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[PROXY_KEY] = proxy
    app.router.add_get("/health", _health)
    app.router.add_put("/tasks/{task_id}", _add)
    app.router.add_get("/tasks/{task_id}/usage", _usage)
    app.router.add_put("/tasks/{task_id}/egress", _add_egress)
    app.router.add_get("/tasks/{task_id}/egress", _egress)
    app.router.add_delete("/tasks/{task_id}", _remove)
    return app


async def serve_control(proxy: ModelProxy, path: Path) -> web.AppRunner:
    """Listen on ``path`` (asyncio replaces a stale socket file), usable by this user only."""
    runner = web.AppRunner(
        control_app(proxy), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    old = os.umask(0o077)
    try:
        await web.UnixSite(runner, str(path)).start()
    except BaseException:
        await runner.cleanup()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return runner


class ProxyClient:
    """:class:`ModelSockets` over the proxy's control socket.

    A proxy that does not answer within ``wait_s`` raises :class:`~shared.errors.Unavailable`
    (the executor's message comes back later); a proxy that refuses raises ``RuntimeError``.
    """

    def __init__(self, path: Path, *, wait_s: float = PROXY_WAIT_S) -> None:
        self.path = path
        self.wait_s = wait_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, url: str, body: bytes = b"") -> aiohttp.ClientResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.path)),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            )
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.wait_s
        pause = 0.05
        while True:
            try:
                resp = await self._session.request(method, "http://model-proxy" + url, data=body)
                body = await resp.read()
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # A proxy being restarted is back within a second or two: wait for it, within
                # a bound, rather than hand the task back to the bus.
                if loop.time() + pause > give_up_at:
                    raise Unavailable(
                        f"the model proxy does not answer on {self.path}: {type(exc).__name__}"
                    ) from None
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
        if resp.status >= 300:
            raise RuntimeError(
                f"the model proxy refused {method} {url}: {resp.status} "
                f"{body[:500].decode(errors='replace')}"
            )
        return resp

    async def credential_kind(self) -> str | None:
        resp = await self._call("GET", "/health")
        kind = (await resp.json()).get("credential")
        return kind if isinstance(kind, str) else None

    async def add_task(self, task_id: str, budget: Budget | None = None) -> None:
        body = msgspec.json.encode(budget) if budget is not None else b""
        await self._call("PUT", f"/tasks/{task_id}", body)

    async def remove_task(self, task_id: str) -> None:
        await self._call("DELETE", f"/tasks/{task_id}")

    async def usage(self, task_id: str) -> TaskUsage:
        resp = await self._call("GET", f"/tasks/{task_id}/usage")
        data = await resp.json()
        return TaskUsage.from_dict(data) if isinstance(data, dict) else TaskUsage()

    async def add_egress(self, task_id: str, allow: list[str]) -> None:
        await self._call("PUT", f"/tasks/{task_id}/egress", msgspec.json.encode(allow))

    async def egress_counts(self, task_id: str) -> EgressCounts:
        resp = await self._call("GET", f"/tasks/{task_id}/egress")
        return msgspec.json.decode(await resp.read(), type=EgressCounts)
