"""HTTP handlers of the public API (shapes and status codes: docs/api.md)."""

from __future__ import annotations

import base64
import functools
import hashlib
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from services.gateway import models, params
from services.gateway.http import (
    MAX_BODY,
    MAX_TASK_BODY,
    ApiError,
    json_response,
    note,
    validation_error,
)
from services.gateway.keys import (
    AUTH,
    BUS_LINK,
    LIMITS,
    METRICS,
    PROJECTION,
    RESULTS,
    SETTINGS,
    UPLOADS,
)
from services.gateway.metrics import exposition
from shared import egress, inputs
from shared import events as ev
from shared.bus import MAX_EVENT_BYTES
from shared.errors import Conflict, Unavailable
from shared.results import CONTENT_TYPES, task_prefix
from shared.state import TaskState

routes = web.RouteTableDef()

EXECUTE_MARGIN_S = 300.0
PUBLISH_TIMEOUT_S = 1.5
T = TypeVar("T")


# ---- request helpers ---------------------------------------------------------------------


def authenticate(request: web.Request, token: str | None = None) -> str:
    """Return the caller's tenant, or raise 401 with ``WWW-Authenticate: Bearer``."""
    if token is None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise _unauthorized(
                "missing Authorization header: send `Authorization: Bearer <token>`"
            )
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("the Authorization header must be `Bearer <token>`")
    tenant = request.app[AUTH].tenant_for(token.strip())
    if tenant is None:
        raise _unauthorized("unknown or revoked token")
    note(request, tenant=tenant)
    return tenant


def admit(request: web.Request, tenant: str) -> None:
    """The tenant's submission rate and queued quota (``429`` beyond them)."""
    open_tasks = request.app[PROJECTION].open_by_tenant[tenant]
    request.app[LIMITS].submission(tenant, open_tasks)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: web.Request, kind: type[T]) -> T:
    content_type = request.headers.get("Content-Type")
    if (
        content_type is not None
        and request.content_type
        not in (
            "application/json",
            "application/octet-stream",
        )
        and not request.content_type.endswith("+json")
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send JSON (Content-Type: application/json), not {content_type}",
        )
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty: send a JSON object")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    try:
        return msgspec.convert(_integral_floats_as_ints(data), kind)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None


def _integral_floats_as_ints(body: Any) -> Any:
    """``342.0`` → ``342`` everywhere in the body: JSON (and JSON Schema's ``integer``) do not
    tell them apart, so an integer field must accept it (``timeout_s``, ``repo.depth``). Number
    fields take either. The body is at most 16 MiB of parsed JSON: the walk is bounded by it."""
    if isinstance(body, float) and body.is_integer():
        return int(body)
    if isinstance(body, dict):
        return {key: _integral_floats_as_ints(value) for key, value in body.items()}
    if isinstance(body, list):
        return [_integral_floats_as_ints(value) for value in body]
    return body


def view(task: TaskState) -> models.TaskView:
    return models.TaskView(
        task_id=task.task_id,
        status=task.status.value,
        created_at=task.created_at.isoformat().replace("+00:00", "Z"),
        updated_at=task.updated_at.isoformat().replace("+00:00", "Z"),
        metadata=task.metadata,
        error=task.error,
        warnings=list(task.warnings) or None,
    )


def keyed_task_id(tenant: str, key: str) -> str:
    """The task id an idempotency key stands for: the stream itself is the key's record."""
    digest = hashlib.sha256(f"{tenant}\0{key}".encode()).digest()
    return "t_" + base64.b32encode(digest).decode().lower()[:20]


def _not_found(task_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no task {task_id}", field="task_id")


async def find_task(request: web.Request, tenant: str, task_id: str) -> TaskState:
    """The caller's task; ``404`` only once the event log confirms there is no such task.

    The projection can lag the stream: a restarted gateway answers while it is still
    rebuilding, and another replica's new task is a moment away. So a task the projection does
    not know is looked up in the stream (one direct get) and, when it is there, waited for
    briefly; if it still cannot be shown the answer is ``503`` (retry), never a false ``404``
    that would tell a reconnecting client its task is gone.
    """
    note(request, task_id=task_id)
    projection = request.app[PROJECTION]
    task = projection.get(tenant, task_id)
    if task is not None:
        return task
    if task_id in projection.tasks or not ev.is_task_id(task_id):
        raise _not_found(task_id)  # another tenant's, or not an id at all
    stored = await request.app[BUS_LINK].require().last(task_id, "TaskRequested")
    if stored is None or stored.event.tenant != tenant:
        raise _not_found(task_id)
    await projection.wait_for_task(task_id, timeout=PUBLISH_TIMEOUT_S)
    task = projection.get(tenant, task_id)
    if task is None:
        raise Unavailable("the gateway is still catching up with the event log; retry shortly")
    return task


async def _task(request: web.Request, tenant: str) -> TaskState:
    return await find_task(request, tenant, request.match_info["task_id"])


# ---- submission --------------------------------------------------------------------------


_presets = functools.lru_cache(maxsize=4)(egress.parse_presets)
"""``SANDSTREAM_EGRESS_PRESETS`` parsed once, not per submission (read only)."""

MAX_TASK_EVENT_BYTES = MAX_EVENT_BYTES - 64 * 1024
"""A task's ``TaskRequested`` at most (room under the bus's cap for the envelope)."""


async def store_files(request: web.Request, files: list[models.FileRequest]) -> ev.FilesRef:
    """Pack the task's files (checked by ``task_problem``; a path given twice: the last one
    counts) into one tar and store it: they can be larger than an event."""
    latest = {item.path: item for item in files}
    packed: list[tuple[str, bytes, int]] = []
    total = 0
    for item in latest.values():
        content = base64.b64decode(item.content_b64, validate=True)
        total += len(content)
        if total > inputs.MAX_FILES_BYTES:
            message = f"files hold more than {inputs.MAX_FILES_BYTES} bytes decoded"
            raise ApiError(422, "invalid_field", message, field="files")
        packed.append((item.path, content, inputs.MODES[item.mode]))
    archive = inputs.pack(packed)
    stored = await request.app[RESULTS].store_input(archive)
    return ev.FilesRef(key=stored.key, sha256=stored.sha256, size=stored.size, count=len(packed))


async def submit(
    request: web.Request,
    tenant: str,
    body: models.TaskRequest,
    key: str | None,
    files: ev.FilesRef | None = None,
) -> tuple[str, bool]:
    """Publish ``TaskRequested`` once; return ``(task_id, created)``.

    With an idempotency key the task id is derived from (tenant, key), and the event is
    appended only if the task has no events yet (expected subject sequence 0 on the task's
    subjects, which holds beyond the stream's duplicate window). A replay finds
    the stored request and compares hashes: same body → same task, other body → 409.
    """
    bus = request.app[BUS_LINK].require()
    projection = request.app[PROJECTION]
    digest = models.request_hash(body)
    task_id = keyed_task_id(tenant, key) if key else ev.new_task_id()
    if key and (known := projection.tasks.get(task_id)) is not None:
        return task_id, _same_request(known.request_hash, digest, key)
    event = ev.TaskRequested(
        event_id=ev.event_id(task_id, "TaskRequested"),
        task_id=task_id,
        tenant=tenant,
        spec=body.spec(files),
        idempotency_key=key,
        request_hash=digest,
    )
    encoded = ev.encode(event)
    if (size := len(encoded)) > MAX_TASK_EVENT_BYTES:
        raise ApiError(
            422,
            "task_too_large",
            f"the task's texts (prompt, append_system_prompt, claude_md, settings, ...) make "
            f"{size} bytes as an event; at most {MAX_TASK_EVENT_BYTES}: move content into files",
        )
    limits = request.app[LIMITS]
    limits.publishing(task_id)  # its fold here is not another process's submission
    try:
        # Only a keyed id can be asked for twice; a random one (100 bits) cannot collide, and
        # its retries inside the duplicate window are dropped by the message id.
        expected = 0 if key else None
        ack = await bus.publish(
            event, expected_last_subject_seq=expected, timeout=PUBLISH_TIMEOUT_S, encoded=encoded
        )
    except Conflict:
        ack = None
    except BaseException:
        limits.not_stored(task_id)
        raise
    if ack is not None and not ack.duplicate:
        return task_id, True
    limits.not_stored(task_id)
    stored = await bus.last(task_id, "TaskRequested")
    if stored is None or not isinstance(stored.event, ev.TaskRequested):
        raise ApiError(409, "conflict", "the task id is taken by a request that cannot be read")
    return task_id, _same_request(stored.event.request_hash, digest, key)


def _same_request(stored_hash: str, digest: str, key: str | None) -> bool:
    if stored_hash != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {key!r} was already used with a different request body",
            field="Idempotency-Key",
        )
    return False


@routes.post("/v1/tasks")
async def create_task(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    admit(request, tenant)
    key = params.idempotency_key(request)
    length = request.content_length
    large = length is None or length > MAX_BODY
    if large:  # the app's limit is 1 MiB; a task's body may be larger (its inline files)
        async with request.app[UPLOADS]:
            body = await read_json(request.clone(client_max_size=MAX_TASK_BODY), models.TaskRequest)
    else:
        body = await read_json(request, models.TaskRequest)
    settings = request.app[SETTINGS]
    presets = _presets(settings.egress_presets)
    if problem := models.task_problem(body, allow_file=settings.allow_file_repos, presets=presets):
        field, message = problem
        raise ApiError(422, "invalid_field", message, field=field)
    if body.follow_up is not None:
        earlier = request.app[PROJECTION].get(tenant, body.follow_up)
        # Another tenant's task reads as no task at all: the answer says nothing of it.
        if earlier is None:
            message = f"follow_up names no task of yours: {body.follow_up}"
            raise ApiError(422, "invalid_field", message, field="follow_up")
        if not earlier.status.terminal:
            raise ApiError(
                422,
                "invalid_field",
                f"follow_up names task {body.follow_up}, which has not ended (status "
                f"{earlier.status.value}): a follow-up starts from its final workspace",
                field="follow_up",
            )
    files = await store_files(request, body.files) if body.files else None
    task_id, created = await submit(request, tenant, body, key, files)
    note(request, task_id=task_id)
    # Read-your-writes: once we answer, GET /v1/tasks/{id} knows the task.
    task = await request.app[PROJECTION].wait_for_task(task_id, timeout=PUBLISH_TIMEOUT_S)
    status = task.status.value if task is not None else "queued"
    accepted = models.Accepted(task_id=task_id, status=status, links=models.links(task_id))
    return json_response(accepted, 202 if created else 200, {"Location": accepted.links.self})


# ---- reads -------------------------------------------------------------------------------


@routes.get("/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    wait = params.wait_seconds(request)
    task = await _task(request, tenant)
    if wait > 0 and not task.status.terminal:
        task = await request.app[PROJECTION].wait_terminal(task.task_id, wait) or task
    return json_response(await full_view(request, task))


async def full_view(request: web.Request, task: TaskState) -> models.TaskView:
    """The task's view, with its stored result once there is one."""
    out = view(task)
    if task.result_location is not None:
        out.result = await request.app[RESULTS].get(task.task_id)
    return out


@routes.get("/v1/tasks/{task_id}/result")
async def get_result(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    task = await _task(request, tenant)
    result = await request.app[RESULTS].get(task.task_id) if task.result_location else None
    if result is None:
        raise ApiError(
            409,
            "result_not_ready",
            f"task {task.task_id} has no stored result yet (status {task.status.value}); "
            "GET /v1/tasks/{id}?wait=60 returns when it ends",
            field="task_id",
        )
    return json_response(result)


@routes.get("/v1/tasks/{task_id}/artifacts/{name}")
async def get_artifact(request: web.Request) -> web.StreamResponse:
    """One stored object of the task, as ``ResultStored`` lists it: its own content type,
    its sha256 as the ``ETag`` (``If-None-Match`` answers ``304``)."""
    tenant = authenticate(request)
    task = await _task(request, tenant)
    name = request.match_info["name"]
    if name not in CONTENT_TYPES:
        known = ", ".join(sorted(CONTENT_TYPES))
        raise ApiError(
            404, "artifact_not_found", f"no artifact {name!r}: one of {known}", field="name"
        )
    stored = await request.app[BUS_LINK].require().last(task.task_id, "ResultStored")
    if stored is None or not isinstance(stored.event, ev.ResultStored):
        raise ApiError(
            409,
            "result_not_ready",
            f"task {task.task_id} has no stored result yet (status {task.status.value})",
            field="task_id",
        )
    key = task_prefix(task.task_id) + name
    listed = next((o for o in stored.event.objects if o.key == key), None)
    if listed is None:
        raise ApiError(
            404, "artifact_not_found", f"task {task.task_id} has no {name}", field="name"
        )
    etag = f'"{listed.sha256}"'
    headers = {"ETag": etag, "Content-Type": CONTENT_TYPES[name], "Cache-Control": "private"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={"ETag": etag})
    data = await request.app[RESULTS].object(key)
    if data is None:
        raise ApiError(
            404,
            "artifact_not_found",
            f"{name} of task {task.task_id} is gone from the store",
            field="name",
        )
    return web.Response(body=data, headers=headers)


@routes.post("/execute")
async def execute(request: web.Request) -> web.Response:
    """The synchronous form: submit, wait for the end and the stored result, answer both."""
    # With the header, nobody unauthenticated gets their body parsed.
    header_tenant = authenticate(request) if "Authorization" in request.headers else None
    body = await read_json(request, models.ExecuteRequest)
    if header_tenant is not None:
        tenant = header_tenant
    elif body.auth_token is not None:
        tenant = authenticate(request, body.auth_token)
    else:
        raise _unauthorized("send the token as `Authorization: Bearer <token>` or `auth_token`")
    admit(request, tenant)
    key = params.idempotency_key(request)
    task_request = body.as_task()
    task_id, _ = await submit(request, tenant, task_request, key)
    note(request, task_id=task_id)
    projection = request.app[PROJECTION]
    # The lifecycle ends the task by its deadline; the margin covers queueing and storing.
    task = await projection.wait_stored(task_id, task_request.timeout_s + EXECUTE_MARGIN_S)
    if task is None:
        raise ApiError(504, "not_finished", f"task {task_id} did not finish in time")
    out = await full_view(request, task)
    return json_response(
        models.ExecuteResponse(
            task_id=task_id, status=out.status, result=out.result, error=out.error
        )
    )


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    limit, start = params.page(request)
    projection = request.app[PROJECTION]
    if not projection.ready.is_set():  # a partial list would hide tasks that exist
        raise Unavailable("the gateway is still catching up with the event log; retry shortly")
    ids = projection.by_tenant.get(tenant, [])
    page = ids[start : start + limit]
    tasks = [view(projection.tasks[i]) for i in page]
    more = start + limit < len(ids)
    return json_response(models.TaskPage(tasks, str(start + limit) if more else None))


@routes.post("/v1/tasks/{task_id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    return await _cancel(request)


@routes.delete("/v1/tasks/{task_id}")
async def cancel_task_deprecated(request: web.Request) -> web.Response:
    """Deprecated alias of ``POST /v1/tasks/{id}/cancel`` (the task is kept, not deleted)."""
    response = await _cancel(request)
    response.headers["Deprecation"] = "true"
    response.headers["Link"] = f'<{request.path}/cancel>; rel="successor-version"'
    return response


async def _cancel(request: web.Request) -> web.Response:
    """Ask the lifecycle to cancel the task: ``202``, or ``409`` once it has ended."""
    tenant = authenticate(request)
    task = await _task(request, tenant)
    if task.status.terminal:
        raise ApiError(409, "already_finished", f"task {task.task_id} already ended: {task.status}")
    bus = request.app[BUS_LINK].require()
    await bus.publish(
        ev.TaskCancelRequested(
            event_id=ev.event_id(task.task_id, "TaskCancelRequested"),
            task_id=task.task_id,
            tenant=tenant,
        ),
        timeout=PUBLISH_TIMEOUT_S,
    )
    return json_response(view(task), 202)


# ---- operations --------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    link = request.app[BUS_LINK]
    projection = request.app[PROJECTION]
    checks = {"nats": link.connected, "projection": projection.ready.is_set()}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return json_response(body, 200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    text = exposition(
        request.app[METRICS], request.app[PROJECTION], connected=request.app[BUS_LINK].connected
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_openapi_body(), content_type="application/json")


@functools.cache
def _openapi_body() -> bytes:
    """The document exactly as committed in ``schemas/openapi.json``."""
    from services.gateway.openapi import openapi
    from services.schemas import render

    return render(openapi()).encode()
