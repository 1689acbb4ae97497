"""Log lines as an operator's tools read them (each case in its own process: the
configuration is global)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def lines(level: str, code: str) -> list[dict[str, Any]]:
    program = f"from shared import logging\nlogging.configure({level!r}, json=True)\n{code}"
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in done.stderr.splitlines()]


def test_a_summary_line_is_the_json_structlog_would_write() -> None:
    code = (
        "import structlog\n"
        "structlog.get_logger('x').info('request', method='GET', status=200)\n"
        "logging.summary('request', {'method': 'GET', 'status': 200})\n"
    )
    structlog_line, summary_line = lines("INFO", code)
    assert summary_line.keys() == structlog_line.keys()
    assert summary_line["timestamp"] >= structlog_line["timestamp"]
    del summary_line["timestamp"], structlog_line["timestamp"]
    assert (
        summary_line
        == structlog_line
        == {
            "method": "GET",
            "status": 200,
            "event": "request",
            "level": "info",
        }
    )


def test_summary_lines_follow_the_level() -> None:
    assert lines("WARNING", "logging.summary('request', {'status': 200})") == []
