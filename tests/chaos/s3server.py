"""moto's S3 server for the chaos run: it survives SIGKILL with its objects, as a real store would.

moto keeps its objects in memory. Its recorder appends every request it serves to a file; this
launcher replays that file into the new process, in-process (a WSGI test client, no socket),
*before* it listens, then serves. So no client request is served while the old state comes
back (moto's own replay, over HTTP, turns recording off while it runs: a request served then
would be forgotten by the next restart), and every recorded write is applied again in order.

Each record is taken under one lock: moto appends it with two writes from whichever server
thread handles the request, and two large requests at once could interleave. A record cut
short by a SIGKILL (its request never got an answer, so its client tries again) is dropped.

    python -m tests.chaos.s3server PORT RECORDING
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any


def trim_recording(path: Path) -> int:
    """Drop a last record that is incomplete; return how many whole records the file holds."""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    lines = whole.splitlines()
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            whole = whole[: whole.rfind(b"\n", 0, len(whole) - 1) + 1]
            lines.pop()
    if len(whole) != len(data):
        path.write_bytes(whole)
    return len(lines)


def replay(app: Any, path: Path) -> int:
    """Apply every recorded request to ``app`` again, in order; return how many."""
    from urllib.parse import urlsplit

    from werkzeug.test import Client

    client = Client(app)
    count = 0
    for line in path.read_bytes().splitlines():
        entry = json.loads(line)
        body = entry.get("body") or b""
        if entry.get("body_encoded"):
            body = base64.b64decode(body)
        headers = {
            k: v
            for k, v in (entry.get("headers") or {}).items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        url = urlsplit(entry["url"])
        client.open(
            url.path, method=entry["method"], query_string=url.query, headers=headers, data=body
        )
        count += 1
    return count


def main() -> None:
    port, recording = int(sys.argv[1]), Path(sys.argv[2])
    os.environ["MOTO_PORT"] = str(port)
    os.environ["MOTO_RECORDER_FILEPATH"] = str(recording)
    os.environ["MOTO_ENABLE_RECORDING"] = "1"

    from moto.moto_api import recorder
    from moto.moto_api._internal.recorder import models
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import main as serve

    lock = threading.Lock()
    record = models.Recorder._record_request

    def record_whole(self: Any, request: Any, body: bytes | None = None) -> None:
        with lock:
            record(self, request, body)

    models.Recorder._record_request = record_whole  # type: ignore[method-assign]
    if recording.exists() and trim_recording(recording):
        recorder.stop_recording()  # what is replayed is in the file already
        done = replay(DomainDispatcherApplication(create_backend_app), recording)
        recorder.start_recording()
        print(f"s3server: replayed {done} recorded requests", flush=True)
    serve(["-H", "127.0.0.1", "-p", str(port)])


if __name__ == "__main__":
    main()
