#!/usr/bin/env python3
"""Bare sandbox benchmark: how long does one `claude -p` take in the sandbox image?

Stdlib only (runs with any python3 >= 3.9, no venv needed). Starts an instant fake
of the Anthropic Messages API on a Unix socket in a temp directory, bind-mounts
that directory at /run/sandstream, and runs the CLI in the hardened configuration
(network none, read-only root, cap-drop ALL, uid 1000, the sandbox's default limits: 1 CPU,
1 GiB, 256 pids, ...). Inside the container
socat bridges 127.0.0.1:4000 to the socket, the way the real service does.

Measures, over N runs each:
  version  fresh container: `docker run ... claude --version`
  fresh    fresh container: `docker run ... socat & claude -p`
  exec     one idle container (CMD sleep), each run by `docker exec`

  rate     with --parallel P: --rate-runs fresh runs, P at a time (runs per second)

Usage: python3 bench/bare_run.py [-n 5] [--image sandstream/sandbox:latest] [--parallel P]
Prints one line per measurement and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import os
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HARDENED = [
    "--network",
    "none",
    "--read-only",
    "--tmpfs",
    "/tmp:rw,exec,nosuid,size=256m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--pids-limit",
    "256",
    "--memory",
    "1g",
    "--cpus",  # the sandbox's default share (SANDSTREAM_SANDBOX_CPUS): the CLI's start is CPU-bound
    "1",
    "--init",
    "--user",
    "1000:1000",
]
ENV = [
    "-e",
    "ANTHROPIC_BASE_URL=http://127.0.0.1:4000",
    "-e",
    "ANTHROPIC_API_KEY=sk-bench-fake",
    "-e",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
]
INNER = (
    "socat TCP-LISTEN:4000,bind=127.0.0.1,fork,reuseaddr "
    # All three std fds redirected: a background process that keeps the exec's
    # stdout/stderr open makes `docker exec` wait ~2 s more for them to close.
    "UNIX-CONNECT:/run/sandstream/model.sock </dev/null >/dev/null 2>&1 & "
    "for i in $(seq 200); do (: </dev/tcp/127.0.0.1/4000) 2>/dev/null && break; sleep 0.005; done; "
    "claude -p 'say ok' --output-format json --max-turns 1"
)


def docker_client() -> str:
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else "docker"


class FakeAPI(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = 0

    def log_message(self, *args):  # client_address is '' on a Unix socket
        pass

    def _send_json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
            self._send_json(
                404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
            )
            return
        type(self).requests += 1
        model = req.get("model", "fake")
        msg = {
            "id": "msg_" + uuid.uuid4().hex[:20],
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        }
        if not req.get("stream"):
            msg.update(content=[{"type": "text", "text": "ok"}], stop_reason="end_turn")
            self._send_json(200, msg)
            return
        events = [
            ("message_start", {"type": "message_start", "message": msg}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "ok"},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 1},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        body = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send_json(
            404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
        )


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return (time.perf_counter() - t) * 1000, p


def check_result(p: subprocess.CompletedProcess) -> None:
    if p.returncode != 0:
        raise SystemExit(
            f"run failed rc={p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}"
        )
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res.get("is_error") or res.get("result") != "ok":
        raise SystemExit(f"unexpected result: {res}")


class Floor:
    """The bare baseline, one run at a time (for benches that pair each of their runs with
    one): the fake API on its socket, and an idle hardened container for ``exec_once``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.docker = docker_client()
        self.sockdir = tempfile.mkdtemp(prefix="sandstream-bench-")
        os.chmod(self.sockdir, 0o755)
        sock = os.path.join(self.sockdir, "model.sock")
        self.srv = UnixServer(sock, FakeAPI)
        os.chmod(sock, 0o666)  # the container runs as uid 1000
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.ws = tempfile.mkdtemp(prefix="sandstream-ws-")
        os.chown(self.ws, 1000, 1000) if os.geteuid() == 0 else None
        self.mounts = ["-v", f"{self.sockdir}:/run/sandstream", "-v", f"{self.ws}:/workspace"]
        self.name = "sandstream-bench-" + uuid.uuid4().hex[:8]
        subprocess.run(
            [self.docker, "run", "-d", "--name", self.name, *HARDENED, *ENV, *self.mounts,
             self.image],
            check=True, capture_output=True,
        )  # fmt: skip

    def run_once(self) -> float:
        """A fresh hardened container running the CLI: ms."""
        ms, p = timed(
            [self.docker, "run", "--rm", *HARDENED, *ENV, *self.mounts, self.image, "bash", "-c",
             INNER]
        )  # fmt: skip
        check_result(p)
        return ms

    def exec_once(self) -> float:
        """The CLI by ``docker exec`` in the idle container: ms."""
        ms, p = timed([self.docker, "exec", self.name, "bash", "-c", INNER])
        check_result(p)
        return ms

    def close(self) -> None:
        subprocess.run([self.docker, "rm", "-f", self.name], capture_output=True)
        self.srv.shutdown()
        self.srv.server_close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        shutil.rmtree(self.ws, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--image", default="sandstream/sandbox:latest")
    ap.add_argument("--parallel", type=int, default=0, help="also: fresh runs this many at once")
    ap.add_argument("--rate-runs", type=int, default=24)
    args = ap.parse_args()

    results: dict[str, list[float]] = {"version": [], "fresh": [], "exec": []}
    floor = Floor(args.image)
    docker, mounts = floor.docker, floor.mounts
    try:
        for _ in range(args.n):
            ms, p = timed(
                [docker, "run", "--rm", *HARDENED, *mounts, args.image, "claude", "--version"]
            )
            if p.returncode != 0:
                raise SystemExit(p.stderr)
            results["version"].append(ms)
            print(f"version {ms:7.0f} ms", flush=True)
        for _ in range(args.n):
            results["fresh"].append(floor.run_once())
            print(f"fresh   {results['fresh'][-1]:7.0f} ms", flush=True)
        for _ in range(args.n):
            results["exec"].append(floor.exec_once())
            print(f"exec    {results['exec'][-1]:7.0f} ms", flush=True)
        if args.parallel:
            fresh = [docker, "run", "--rm", *HARDENED, *ENV, *mounts, args.image, "bash", "-c"]
            began = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
                for _, p in pool.map(lambda _: timed([*fresh, INNER]), range(args.rate_runs)):
                    check_result(p)
            rate = args.rate_runs / (time.perf_counter() - began)
            print(f"rate    {rate:7.2f} runs/s ({args.parallel} at a time)", flush=True)
    finally:
        floor.close()

    summary = {
        k: {
            "median_ms": round(statistics.median(v)),
            "min_ms": round(min(v)),
            "max_ms": round(max(v)),
            "n": len(v),
        }
        for k, v in results.items()
        if v
    }
    if args.parallel:
        summary["rate"] = {"runs_per_s": round(rate, 2), "parallel": args.parallel}
    summary["model_requests"] = FakeAPI.requests
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
