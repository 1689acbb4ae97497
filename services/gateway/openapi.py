"""``/openapi.json``: generated from the same msgspec types that validate requests.

Every status code an operation can answer is declared, and each error response lists the
``error.code`` values it can carry (an ``enum`` on the code), so a fuzzer checking responses
against this document also checks the error codes. The prose contract is ``docs/api.md``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway import models
from services.gateway.params import (
    CURSOR_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    LAST_EVENT_ID_PATTERN,
    MAX_LIMIT,
    MAX_WAIT_S,
)
from shared import events as ev
from shared.results import CONTENT_TYPES, TaskResult

REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}}}


def _answer(description: str, name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if name:
        out.update(_json(name))
    return out


def _error(description: str, *codes: str) -> dict[str, Any]:
    """An error response whose ``error.code`` is one of ``codes``."""
    schema = {
        "allOf": [
            {"$ref": REF.format(name="ErrorResponse")},
            {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {"code": {"enum": list(codes)}},
                    }
                },
            },
        ]
    }
    return {
        "description": f"{description} (error.code: {', '.join(codes)})",
        "content": {"application/json": {"schema": schema}},
    }


UNAUTHORIZED = _error("missing or unknown token", "unauthorized")
NOT_FOUND = _error("no such task for this tenant", "not_found")
UNAVAILABLE = _error("the event log is unreachable or still loading; retry", "unavailable")
BAD_BODY = _error("the body is not a JSON object", "invalid_json", "invalid_body")
BODY_TOO_LARGE = _error(
    "the body is larger than 16 MiB (POST /v1/tasks) or 1 MiB (elsewhere)", "body_too_large"
)
MEDIA_TYPE = _error("the body is not JSON", "unsupported_media_type")
INVALID_FIELD = _error(
    "a field is invalid (follow_up: it names no ended task of this tenant), or the task's "
    "texts together are too large for one event",
    "invalid_field",
    "unknown_field",
    "missing_field",
    "task_too_large",
)
TOO_MANY_SUBMISSIONS = _error(
    "over the tenant's submission rate or queued-task quota; see Retry-After",
    "rate_limited",
    "quota_exceeded",
)
IDEMPOTENCY_CONFLICT = _error(
    "the Idempotency-Key was used with another body", "idempotency_conflict", "conflict"
)

TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-255 visible ASCII characters; the same key and body give the same task",
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
}


def _task_answers(ok: dict[str, Any], *extra: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """The responses of an operation on one task: ``ok``, ``extra``, and the common errors."""
    return {"200": ok, **dict(extra), "401": UNAUTHORIZED, "404": NOT_FOUND, "503": UNAVAILABLE}


def _submit_answers(ok: dict[str, Any], *extra: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        **ok,
        "400": _error(
            "the body is not a JSON object, or the Idempotency-Key is malformed",
            "invalid_json",
            "invalid_body",
            "invalid_idempotency_key",
        ),
        "401": UNAUTHORIZED,
        "409": IDEMPOTENCY_CONFLICT,
        "413": BODY_TOO_LARGE,
        "415": MEDIA_TYPE,
        "422": INVALID_FIELD,
        "429": TOO_MANY_SUBMISSIONS,
        **dict(extra),
        "503": UNAVAILABLE,
    }


def _cancel(summary: str, *, deprecated: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": BEARER,
        "parameters": [TASK_ID],
        "responses": {
            "202": _answer("cancellation requested", "TaskView"),
            "401": UNAUTHORIZED,
            "404": NOT_FOUND,
            "409": _error("the task has already ended", "already_finished"),
            "503": UNAVAILABLE,
        },
    }
    if deprecated:
        operation["deprecated"] = True
    return operation


BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
SSE_EVENT = {
    "type": "object",
    "description": "one Server-Sent Event: id = stream sequence, event = the event's type, "
    "data = the event as JSON (schemas/events/<type>.json)",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"enum": sorted(ev.type_name(cls) for cls in ev.EVENT_TYPES)},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def openapi() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            models.TaskRequest,
            models.Accepted,
            models.TaskView,
            models.TaskPage,
            models.ExecuteRequest,
            models.ExecuteResponse,
            models.ErrorResponse,
            TaskResult,
        ],
        ref_template=REF,
    )
    components["TaskRequest"]["allOf"] = models.CROSS_FIELD_RULES
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sandstream",
            "version": "1",
            "description": "Run Claude Code tasks in hardened sandboxes. Contract: docs/api.md.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task",
                    "security": BEARER,
                    "parameters": [IDEMPOTENCY_KEY],
                    "requestBody": {"required": True, **_json("TaskRequest")},
                    "responses": _submit_answers(
                        {
                            "202": _answer("accepted", "Accepted"),
                            "200": _answer("idempotent replay of an accepted task", "Accepted"),
                        }
                    ),
                },
                "get": {
                    "summary": "List the tenant's tasks, oldest first",
                    "security": BEARER,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "next_cursor of the previous page; empty: the start",
                            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                        },
                    ],
                    "responses": {
                        "200": _answer("a page of tasks", "TaskPage"),
                        "400": _error("a query parameter is invalid", "invalid_query"),
                        "401": UNAUTHORIZED,
                        "503": UNAVAILABLE,
                    },
                },
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A task's status (?wait=S: return as soon as it ends, S ≤ 60)",
                    "security": BEARER,
                    "parameters": [
                        TASK_ID,
                        {
                            "name": "wait",
                            "in": "query",
                            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
                        },
                    ],
                    "responses": _task_answers(
                        _answer("the task", "TaskView"),
                        ("400", _error("a query parameter is invalid", "invalid_query")),
                    ),
                },
                "delete": _cancel(
                    "Request cancellation (deprecated alias of POST .../cancel)", deprecated=True
                ),
            },
            "/v1/tasks/{task_id}/cancel": {"post": _cancel("Request cancellation")},
            "/v1/tasks/{task_id}/events": {
                "get": {
                    "summary": "History then live events, as Server-Sent Events",
                    "description": "id: is the event's stream sequence; the stream ends after "
                    "the task's terminal event. Last-Event-ID (or ?last_event_id) resumes "
                    "after that sequence; ?follow=false sends the history only.",
                    "security": BEARER,
                    "parameters": [
                        TASK_ID,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN},
                        },
                        {
                            "name": "last_event_id",
                            "in": "query",
                            "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN},
                        },
                        {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": _task_answers(
                        {
                            "description": "text/event-stream; id = stream sequence",
                            "content": {"text/event-stream": {"schema": SSE_EVENT}},
                        },
                        (
                            "400",
                            _error(
                                "Last-Event-ID or a query parameter is invalid",
                                "invalid_last_event_id",
                                "invalid_query",
                            ),
                        ),
                        (
                            "429",
                            _error("too many open streams for this tenant", "too_many_streams"),
                        ),
                    ),
                }
            },
            "/v1/tasks/{task_id}/result": {
                "get": {
                    "summary": "The stored result of a finished task",
                    "security": BEARER,
                    "parameters": [TASK_ID],
                    "responses": _task_answers(
                        _answer("result.json", "TaskResult"),
                        (
                            "409",
                            _error("the task has no stored result yet", "result_not_ready"),
                        ),
                    ),
                }
            },
            "/v1/tasks/{task_id}/artifacts/{name}": {
                "get": {
                    "summary": "One stored object of a finished task (ETag: its sha256)",
                    "security": BEARER,
                    "parameters": [
                        TASK_ID,
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "one of " + ", ".join(sorted(CONTENT_TYPES)),
                        },
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "the object, with its own Content-Type",
                            "content": {
                                kind.split(";")[0]: {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                                for kind in sorted(set(CONTENT_TYPES.values()))
                            },
                        },
                        "304": {"description": "unchanged (If-None-Match)"},
                        "401": UNAUTHORIZED,
                        "404": _error(
                            "no such task for this tenant, or no such object of it",
                            "not_found",
                            "artifact_not_found",
                        ),
                        "409": _error("the task has no stored result yet", "result_not_ready"),
                        "503": UNAVAILABLE,
                    },
                }
            },
            "/execute": {
                "post": {
                    "summary": "Run a task and wait for its result",
                    "description": "The token goes in Authorization or as auth_token.",
                    "parameters": [IDEMPOTENCY_KEY],
                    "requestBody": {"required": True, **_json("ExecuteRequest")},
                    "responses": _submit_answers(
                        {"200": _answer("the finished task", "ExecuteResponse")},
                        ("504", _error("the task did not end in time", "not_finished")),
                    ),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "liveness",
                    "responses": {"200": {"description": "alive", **_object()}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "readiness: connected to the event log and caught up",
                    "responses": {
                        "200": {"description": "ready", **_object()},
                        "503": {"description": "not ready", **_object()},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "the text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": {"description": "OpenAPI 3.1", **_object()}},
                }
            },
        },
    }


def _object() -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"type": "object"}}}}
