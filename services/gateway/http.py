"""The one place that turns failures into HTTP answers of the common error shape."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from services.gateway.keys import METRICS
from services.gateway.models import ErrorBody, ErrorResponse
from shared import logging
from shared.errors import Unavailable

_encoder = msgspec.json.Encoder()
MAX_BODY = 1024 * 1024
MAX_TASK_BODY = 16 * 1024 * 1024
"""``POST /v1/tasks`` only: inline files (10 MiB decoded, base64 in JSON)."""
_PATH = re.compile(r"- at (?:`key` in )?`\$((?:\.[^`\[.]+|\[[^\]]*\])*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


class ApiError(Exception):
    """An error for the client: ``status``, a machine ``code``, a message, maybe a field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: ApiError) -> web.Response:
    body = ErrorResponse(ErrorBody(exc.code, exc.message, exc.field))
    return json_response(body, exc.status, exc.headers)


def validation_error(exc: msgspec.ValidationError) -> ApiError:
    """Name the field a msgspec validation error is about, as a dotted path."""
    text = str(exc)
    path_match = _PATH.search(text)
    path = path_match.group(1) if path_match else ""
    unknown = _UNKNOWN.search(text)
    if unknown:
        field = (path + "." + unknown.group(1)).lstrip(".")
        return ApiError(422, "unknown_field", f"unknown field `{field}`", field=field)
    field = path.replace("[...]", "").lstrip(".") or None
    message = _PATH.sub("", text).strip().rstrip("-").strip()
    if field:
        message = f"{field}: {message}"
    code = "missing_field" if text.startswith("Object missing required field") else "invalid_field"
    if code == "missing_field":
        missing = re.search(r"field `([^`]+)`", text)
        name = missing.group(1) if missing else ""
        field = ((field + ".") if field else "") + name
        message = f"`{field}` is required"
    return ApiError(422, code, message, field=field)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


LOG_FIELDS = web.RequestKey("log_fields", dict)
"""What the request's summary line says besides its status and time (method, path; the
tenant and task once known: :func:`note`)."""


def note(request: web.Request, **fields: str) -> None:
    """Add ``fields`` to the request's summary line, and to every other line logged while it
    is handled (bound as context variables)."""
    structlog.contextvars.bind_contextvars(**fields)
    if (noted := request.get(LOG_FIELDS)) is not None:
        noted.update(fields)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as ``{"error": {...}}`` and log one summary line per request."""
    started = time.perf_counter()
    status = 500
    fields: dict[str, object] = {"method": request.method, "path": request.path}
    request[LOG_FIELDS] = fields
    with structlog.contextvars.bound_contextvars(method=request.method, path=request.path):
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return error_response(exc)
        except Unavailable as exc:
            status = 503
            return error_response(
                ApiError(503, "unavailable", str(exc), headers={"Retry-After": "1"})
            )
        except web.HTTPRequestEntityTooLarge:
            status = 413
            limit = "16 MiB" if (request.method, request.path) == ("POST", "/v1/tasks") else "1 MiB"
            return error_response(
                ApiError(413, "body_too_large", f"the request body is larger than {limit}")
            )
        except web.HTTPException as exc:
            status = exc.status
            code = exc.reason.lower().replace(" ", "_")
            # 405 must say which methods the resource has (RFC 9110).
            kept = {k: v for k, v in exc.headers.items() if k == "Allow"}
            return error_response(ApiError(exc.status, code, exc.reason, headers=kept))
        finally:
            elapsed = time.perf_counter() - started
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            request.app[METRICS].observe(route, status, elapsed)
            if request.path not in ("/healthz", "/readyz", "/metrics"):
                # Written without structlog's processors, the slow part of its lines
                # (shared.logging.summary): the fields are the request's own.
                fields["status"] = status
                fields["ms"] = round(elapsed * 1000, 2)
                logging.summary("request", fields)
