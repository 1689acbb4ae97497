"""``/openapi.json``: generated from the same msgspec types that validate requests."""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway import models
from shared.results import TaskResult

REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}}}


def _answer(description: str, name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if name:
        out.update(_json(name))
    return out


ERRORS = {
    "401": _answer("missing or unknown token", "ErrorResponse"),
    "404": _answer("no such task for this tenant", "ErrorResponse"),
    "503": _answer("the event log is unreachable; retry", "ErrorResponse"),
}
TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}


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
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sandstream", "version": "1"},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        }
                    ],
                    "requestBody": {"required": True, **_json("TaskRequest")},
                    "responses": {
                        "202": _answer("accepted", "Accepted"),
                        "200": _answer("idempotent replay of an accepted task", "Accepted"),
                        "400": _answer("body is not a JSON object", "ErrorResponse"),
                        "409": _answer("Idempotency-Key reused with another body", "ErrorResponse"),
                        "413": _answer("body over 1 MiB", "ErrorResponse"),
                        "422": _answer("a field is invalid", "ErrorResponse"),
                        **ERRORS,
                    },
                },
                "get": {
                    "summary": "List the tenant's tasks",
                    "security": bearer,
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _answer("a page of tasks", "TaskPage"), **ERRORS},
                },
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A task's status (wait up to 60 s for its end with ?wait=S)",
                    "security": bearer,
                    "parameters": [
                        TASK_ID,
                        {"name": "wait", "in": "query", "schema": {"type": "number"}},
                    ],
                    "responses": {"200": _answer("the task", "TaskView"), **ERRORS},
                },
                "delete": {
                    "summary": "Request cancellation",
                    "security": bearer,
                    "parameters": [TASK_ID],
                    "responses": {"202": _answer("cancellation requested", "TaskView"), **ERRORS},
                },
            },
            "/v1/tasks/{task_id}/events": {
                "get": {
                    "summary": "History then live events, as Server-Sent Events",
                    "security": bearer,
                    "parameters": [
                        TASK_ID,
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": {"description": "text/event-stream; id = stream sequence"},
                        **ERRORS,
                    },
                }
            },
            "/v1/tasks/{task_id}/result": {
                "get": {
                    "summary": "The stored result of a finished task",
                    "security": bearer,
                    "parameters": [TASK_ID],
                    "responses": {"200": _answer("result.json", "TaskResult"), **ERRORS},
                }
            },
            "/execute": {
                "post": {
                    "summary": "Run a task and wait for its result",
                    "requestBody": {"required": True, **_json("ExecuteRequest")},
                    "responses": {"200": _answer("the finished task", "ExecuteResponse"), **ERRORS},
                }
            },
            "/healthz": {"get": {"summary": "liveness", "responses": {"200": _answer("alive")}}},
            "/readyz": {
                "get": {
                    "summary": "readiness",
                    "responses": {"200": _answer("ready"), "503": _answer("not ready")},
                }
            },
            "/openapi.json": {
                "get": {"summary": "this document", "responses": {"200": _answer("OpenAPI 3.1")}}
            },
        },
    }
