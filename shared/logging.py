"""structlog, configured once in each program's ``main``.

JSON lines when stderr is not a terminal, the console renderer when it is. Our own loggers are
structlog-native (a filtering bound logger writing straight to stderr: the fast path, one
summary line per request or message); standard-library loggers (aiohttp, nats, botocore) are
routed through the same processors and renderer.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog

_encoder = msgspec.json.Encoder()


class _Summaries:
    """Where :func:`summary` writes, as :func:`configure` set it up."""

    json: TextIO | None = None  # stderr, when lines are JSON
    enabled = True  # INFO lines are written at all


def summary(event: str, fields: dict[str, Any]) -> None:
    """One INFO line, ``event`` with ``fields``: the summary of a request or a message.

    The same JSON line structlog would write, without its processors: through them the
    gateway's line per request took a fifth of its time under load (measured with
    ``bench/gateway_load.py``). Fields bound with ``structlog.contextvars`` are not merged in:
    the caller passes what the line says. On a terminal it goes through structlog as usual.
    """
    if not _Summaries.enabled:
        return
    out = _Summaries.json
    if out is None:
        structlog.get_logger("sandstream").info(event, **fields)
        return
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    out.write(_dumps({**fields, "event": event, "level": "info", "timestamp": stamp}) + "\n")
    out.flush()


def _dumps(obj: object, **_: object) -> str:
    try:
        return _encoder.encode(obj).decode()
    except TypeError:
        return msgspec.json.encode({k: str(v) for k, v in dict(obj).items()}).decode()  # type: ignore[call-overload]


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    use_json = not sys.stderr.isatty() if json is None else json
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    _Summaries.json = sys.stderr if use_json else None
    _Summaries.enabled = numeric <= logging.INFO
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's access log would repeat our one summary line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
