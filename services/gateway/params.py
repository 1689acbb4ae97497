"""Query parameters and headers of the HTTP API: each is parsed here, and ``openapi.py``
declares it from the same constants, so the document and the checks cannot disagree.

Every parser raises ``ApiError(400, ...)`` naming the parameter when the value is malformed.
"""

from __future__ import annotations

import re

from aiohttp import web

from services.gateway.http import ApiError

MAX_WAIT_S = 60
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
CURSOR_PATTERN = r"^[0-9]{0,18}$"
LAST_EVENT_ID_PATTERN = r"^[0-9]{0,19}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_CURSOR = re.compile(CURSOR_PATTERN)
_LAST_EVENT_ID = re.compile(LAST_EVENT_ID_PATTERN)


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header, or ``None`` when absent."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 visible ASCII characters (no spaces)",
            field="Idempotency-Key",
        )
    return key


def _number(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "invalid_query", f"{name} must be a number", field=name) from None
    if value != value:  # NaN
        raise ApiError(400, "invalid_query", f"{name} must be a number", field=name)
    return value


def wait_seconds(request: web.Request) -> float:
    """``?wait=S`` of ``GET /v1/tasks/{id}``: 0 to 60 seconds, 0 when absent."""
    wait = _number(request, "wait")
    if wait is None:
        return 0.0
    if not 0 <= wait <= MAX_WAIT_S:
        raise ApiError(
            400, "invalid_query", f"wait must be between 0 and {MAX_WAIT_S} seconds", field="wait"
        )
    return wait


def page(request: web.Request) -> tuple[int, int]:
    """``(limit, start)`` of ``GET /v1/tasks``: ``?limit`` 1-500 (an integral number, so
    ``10.0`` is 10), ``?cursor`` the ``next_cursor`` of the previous page (empty: the start)."""
    limit = _number(request, "limit")
    if limit is None:
        limit = float(DEFAULT_LIMIT)
    if not limit.is_integer() or not 1 <= limit <= MAX_LIMIT:
        raise ApiError(
            400,
            "invalid_query",
            f"limit must be an integer between 1 and {MAX_LIMIT}",
            field="limit",
        )
    cursor = request.query.get("cursor", "")
    if not _CURSOR.fullmatch(cursor):
        raise ApiError(
            400,
            "invalid_query",
            "cursor must be the next_cursor of a previous page",
            field="cursor",
        )
    return int(limit), int(cursor or 0)


def last_event_id(request: web.Request) -> int:
    """The sequence to resume after: the ``Last-Event-ID`` header, else ``?last_event_id``
    (for clients that cannot set headers); 0 when absent or empty, as a browser's
    ``EventSource`` sends it before it has seen an id. Both are checked when both are given."""
    values = []
    for name, raw in (
        ("Last-Event-ID", request.headers.get("Last-Event-ID")),
        ("last_event_id", request.query.get("last_event_id")),
    ):
        if raw is None:
            continue
        raw = raw.strip()
        if not _LAST_EVENT_ID.fullmatch(raw):
            raise ApiError(
                400,
                "invalid_last_event_id",
                f"{name} must be a stream sequence number (the id: of an event), got {raw[:40]!r}",
                field=name,
            )
        values.append(int(raw or 0))
    return values[0] if values else 0


def follow(request: web.Request) -> bool:
    """``?follow=false`` sends the history only; ``true`` (the default) follows live events."""
    raw = request.query.get("follow", "true").lower()
    if raw not in ("true", "false"):
        raise ApiError(400, "invalid_query", "follow must be true or false", field="follow")
    return raw == "true"
