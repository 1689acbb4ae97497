"""The system under chaos, started from its parts: one nats-server, the four services and
the model proxy, each its own process, and (with ``storage="s3"``) moto's S3 server, a process
of its own too.

moto keeps its objects in memory, so a SIGKILLed moto would come back empty. It records every
request it serves to a file, and a restarted one replays that file into itself before it
listens (``s3server.py``): it comes back with what it had, as a real store would. Objects are
then checked by sha256 like files are.

Each part is a :class:`Part`: a child process with its own log file (appended across
restarts), killed with SIGKILL and started again on demand. Children get ``PR_SET_PDEATHSIG``
so nothing outlives the chaos process even when it is killed itself. Sandboxes carry the run's
``sandstream.instance`` label; only those are ever looked at or removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aioboto3
import aiohttp

from shared.bus import Bus, NatsAuth, StreamSettings, connect
from shared.errors import Unavailable
from shared.identities import Scope, provision, seed_path
from shared.sandbox import MANAGED_FILTER, DockerDriver, SandboxSpec
from shared.settings import DEFAULT_IMAGE
from shared.tokens import create_token
from tests.support.procs import free_port, nats_server_binary

BUS_SERVICES: Final = ("gateway", "lifecycle", "executor", "storage")
SERVICES: Final = (*BUS_SERVICES, "modelproxy")
NATS: Final = "nats-server"
S3: Final = "s3"
BUCKET: Final = "chaos-results"
S3_ENV: Final = {
    "AWS_ACCESS_KEY_ID": "chaos-key",
    "AWS_SECRET_ACCESS_KEY": "chaos-secret-never-logged",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/sandstream-chaos-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sandstream-chaos-aws-creds",
    "AWS_EC2_METADATA_DISABLED": "true",
}
DURABLES: Final = ("lifecycle-admit", "lifecycle", "executor", "storage")
LABEL_INSTANCE: Final = "sandstream.instance"
REPO: Final = Path(__file__).resolve().parents[2]
_KEEP_ENV: Final = ("SANDSTREAM_SANDBOX_IMAGE", "SANDSTREAM_LOG_LEVEL")


def sandbox_image() -> str:
    return os.environ.get("SANDSTREAM_SANDBOX_IMAGE") or DEFAULT_IMAGE


def docker_problem() -> str | None:
    """Why the run cannot happen here (no engine, no image), or ``None``."""
    try:
        probe = subprocess.run(
            ["docker", "image", "inspect", sandbox_image()],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: {exc}"
    if probe.returncode != 0:
        return (
            f"the sandbox image {sandbox_image()} is missing (make image): {probe.stderr.strip()}"
        )
    return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Part:
    """One child process of the system, restartable."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n==== chaos: start #{self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL and reap (by our own child's pid, nothing else)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1
            with open(self.log, "ab") as out:
                out.write(f"\n==== chaos: SIGKILL at {time.time():.3f}\n".encode())

    async def terminate(self, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class System:
    """nats-server plus the four services, in ``root``, configured like ``sandstream up``."""

    def __init__(
        self,
        root: Path,
        *,
        instance: str,
        model_url: str,
        api_key: str,
        max_concurrent: int,
        ack_wait_s: float,
        max_deliver: int,
        tenants: Sequence[str],
        storage: str = "file",
        warm_pool: int = 0,
    ) -> None:
        self.root = root
        self.instance = instance
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.data_dir.mkdir(parents=True)
        self.logs.mkdir()
        self.nats_port = free_port()
        self.port = free_port()
        self.tokens_file = self.data_dir / "tokens"
        self.tokens = {tenant: create_token(self.tokens_file, tenant) for tenant in tenants}
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.results_dir = (self.data_dir / "results").resolve()
        self.storage = storage
        self.s3_port = free_port()
        self.s3_recording = root / "s3-recording.jsonl"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SANDSTREAM_", "AWS_", "MOTO_"))
        }
        env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)
        env.update({k: os.environ[k] for k in _KEEP_ENV if k in os.environ})
        env.update(
            SANDSTREAM_NATS_URL=self.nats_url,
            SANDSTREAM_DATA_DIR=str(self.data_dir.resolve()),
            SANDSTREAM_TOKENS_FILE=str(self.tokens_file.resolve()),
            SANDSTREAM_HOST="127.0.0.1",
            SANDSTREAM_PORT=str(self.port),
            SANDSTREAM_INSTANCE=instance,
            SANDSTREAM_STORAGE_URL=self.results_url,
            SANDSTREAM_MODEL_UPSTREAM=model_url,
            SANDSTREAM_ACK_WAIT_S=str(ack_wait_s),
            SANDSTREAM_MAX_DELIVER=str(max_deliver),
            SANDSTREAM_MAX_CONCURRENT=str(max_concurrent),
            SANDSTREAM_MAX_PER_TENANT=str(max_concurrent),
            SANDSTREAM_WARM_POOL_SIZE=str(warm_pool),
            ANTHROPIC_API_KEY=api_key,
            PYTHONUNBUFFERED="1",
        )
        if storage == "s3":
            env.update(S3_ENV, SANDSTREAM_S3_ENDPOINT_URL=self.s3_endpoint)
        # The same bus identities as `sandstream up`: every service as itself, the harness
        # reading as `reader`.
        self.identities = self.data_dir / "nats"
        conf = provision(
            self.identities,
            Scope(),
            listen=f"127.0.0.1:{self.nats_port}",
            store_dir=self.identities,
        )
        nats_argv = [nats_server_binary(), "-c", str(conf)]
        self.parts: dict[str, Part] = {
            NATS: Part(NATS, nats_argv, {"PATH": env.get("PATH", "")}, self.logs / "nats.log")
        }
        if storage == "s3":
            s3_env = {"PATH": env.get("PATH", ""), **S3_ENV}
            s3_argv = [sys.executable, "-m", "tests.chaos.s3server", str(self.s3_port)]
            s3_argv.append(str(self.s3_recording))
            self.parts[S3] = Part(S3, s3_argv, s3_env, self.logs / "s3.log")
        for name in SERVICES:
            argv = [sys.executable, "-m", f"services.{name}"]
            own = dict(env)
            if name in BUS_SERVICES:
                own["SANDSTREAM_NATS_NKEY"] = str(seed_path(self.identities, name))
            if name != "modelproxy":  # the credential is the model proxy's alone
                own.pop("ANTHROPIC_API_KEY")
            self.parts[name] = Part(name, argv, own, self.logs / f"{name}.log")
        self.bus: Bus | None = None
        self._s3: Any = None  # the audit's own S3 client (aioboto3, not the code under test)
        self._closing = contextlib.AsyncExitStack()

    # ---- starting and stopping -------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Start everything and wait until the gateway is ready and every consumer exists."""
        self.parts[NATS].start()
        await wait_port(self.nats_port, timeout)
        if self.storage == "s3":
            await self._start_s3()
            # moto takes an unsigned create
            async with aiohttp.ClientSession() as http, http.put(self._bucket_url) as r:
                if r.status != 200:
                    raise RuntimeError(f"cannot create the bucket: {r.status}")
        for name in SERVICES:
            self.parts[name].start()
        reader = NatsAuth(nkey=seed_path(self.identities, "reader"))
        self.bus = Bus(await connect(self.nats_url, name="chaos", auth=reader), StreamSettings())
        async with asyncio.timeout(timeout):
            await self._ready()

    async def _ready(self) -> None:
        assert self.bus is not None
        async with aiohttp.ClientSession() as http:
            while True:
                for part in self.parts.values():
                    if not part.alive:
                        tail = part.log.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{part.name} exited at start-up:\n{tail}")
                try:
                    async with http.get(f"{self.url}/readyz") as r:
                        gateway_ready = r.status == 200
                except aiohttp.ClientError:
                    gateway_ready = False
                consumers = 0
                for durable in DURABLES:
                    with contextlib.suppress(Exception):
                        await self.bus.js.consumer_info("TASKS", durable)
                        consumers += 1
                if gateway_ready and consumers == len(DURABLES):
                    return
                await asyncio.sleep(0.1)

    def kill(self, name: str) -> None:
        self.parts[name].kill()

    async def restart(self, name: str) -> None:
        if name == S3:
            await self._start_s3()
            return
        part = self.parts[name]
        part.start()
        if name == NATS:
            await wait_port(self.nats_port, 15.0)

    async def read_object(self, key: str) -> bytes | None:
        """A stored object as the store has it (for the audit), ``None`` when missing."""
        if self.storage != "s3":
            path = self.results_dir / key
            return path.read_bytes() if path.is_file() else None
        if self._s3 is None:
            session = aioboto3.Session(
                aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                region_name=S3_ENV["AWS_DEFAULT_REGION"],
            )
            client = session.client("s3", endpoint_url=self.s3_endpoint)
            self._s3 = await self._closing.enter_async_context(client)
        try:
            response = await self._s3.get_object(Bucket=BUCKET, Key=f"r/{key}")
        except self._s3.exceptions.NoSuchKey:
            return None
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def _bucket_url(self) -> str:
        return f"{self.s3_endpoint}/{BUCKET}"

    @property
    def results_url(self) -> str:
        return f"s3://{BUCKET}/r" if self.storage == "s3" else f"file://{self.results_dir}"

    async def _start_s3(self) -> None:
        """Start moto; it replays its recording before it listens (see ``s3server.py``)."""
        self.parts[S3].start()
        await wait_port(self.s3_port, 60.0)

    async def stop(self) -> None:
        """Services first (graceful, bounded), then nats-server. Never raises."""
        await asyncio.gather(
            *(self.parts[name].terminate(15.0) for name in SERVICES), return_exceptions=True
        )
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.nc.close()
        await self.parts[NATS].terminate(10.0)
        with contextlib.suppress(Exception):
            await self._closing.aclose()
        if S3 in self.parts:
            await self.parts[S3].terminate(10.0)

    # ---- docker --------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return f"{LABEL_INSTANCE}={self.instance}"

    async def containers(self) -> list[str]:
        """Names of the containers (running or not) labelled with this run's instance."""
        driver = await DockerDriver.connect()
        try:
            return sorted(info.name for info in await driver.list([self.label]))
        finally:
            await driver.close()

    async def remove_containers(self) -> int:
        driver = await DockerDriver.connect()
        try:
            found = await driver.list([self.label])
            for info in found:
                await driver.remove(info.name)
            return len(found)
        finally:
            await driver.close()

    async def plant_orphan(self, task_id: str) -> str:
        """A running sandbox of a task the stream has never heard of: the lifecycle must reap it
        when it restarts (its start-up reconcile)."""
        driver = await DockerDriver.connect()
        try:
            spec = SandboxSpec(
                task_id=task_id,
                tenant="chaos",
                image=sandbox_image(),
                deadline=time.time() + 3600,
                labels={"sandstream.stream": "TASKS", LABEL_INSTANCE: self.instance},
            )
            info = await driver.create(spec)
            await driver.start(info.name)
            return info.name
        finally:
            await driver.close()


async def wait_port(port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise Unavailable(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return


_EVENT_FORMAT: Final = "{{.Action}} {{.Actor.Attributes.name}} {{.Actor.Attributes.oldName}}"


class ContainerCreates:
    """Counts ``create`` events of this run's containers, live from ``docker events``, by the
    name each container ends up with: a warm-pool sandbox a task claims is renamed to the
    task's, and counts as that name's create.

    The engine keeps only a short backlog of events, so they are followed from the start of
    the run rather than queried afterwards.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.counts: dict[str, int] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *["docker", "events", "--format", _EVENT_FORMAT],
            *["--filter", "type=container", "--filter", "event=create"],
            *["--filter", "event=rename"],
            *["--filter", f"label={self.label}", "--filter", f"label={MANAGED_FILTER}"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self._reader = asyncio.create_task(self._read(), name="docker-events")
        await asyncio.sleep(0.3)  # `docker events` subscribes before it prints anything

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            action, name, old = [*raw.decode().strip().split(" "), "", ""][:3]
            if action == "create" and name:
                self.counts[name] = self.counts.get(name, 0) + 1
            elif action == "rename" and name and old:
                self.counts[name] = self.counts.get(name, 0) + self.counts.pop(old.lstrip("/"), 0)

    async def stop(self) -> None:
        await asyncio.sleep(0.5)  # let the last events arrive
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5.0)
