"""The Docker sandbox driver against the real engine and the real sandbox image."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.errors import Permanent, Unavailable
from shared.sandbox import (
    KEEPER_DIR,
    KEEPER_UID,
    LABEL_DEADLINE,
    LABEL_MANAGED,
    LABEL_TASK,
    LABEL_TENANT,
    DockerDriver,
    SandboxError,
    SandboxSpec,
    container_config,
)
from tests.support.procs import free_port
from tests.support.sandboxes import TEST_LABEL, count_container_events, docker_driver, sandbox_image

pytestmark = pytest.mark.docker


class Env:
    def __init__(self, driver: DockerDriver, tag: str, tmp: Path) -> None:
        self.driver = driver
        self.tag = tag
        self.tmp = tmp
        self.n = 0

    def spec(self, **kw: object) -> SandboxSpec:
        self.n += 1
        sockets = self.tmp / f"sock{self.n}"
        sockets.mkdir(mode=0o755)
        base: dict[str, object] = {
            "task_id": f"t_drv{self.tag}{self.n}",
            "tenant": "acme",
            "image": sandbox_image(),
            "deadline": time.time() + 300,
            "labels": {TEST_LABEL: self.tag},
            "model_socket_dir": str(sockets),
        }
        base.update(kw)
        return SandboxSpec(**base)  # type: ignore[arg-type]

    async def running(self, **kw: object) -> str:
        info = await self.driver.create(self.spec(**kw))
        await self.driver.start(info.name)
        return info.name

    async def sh(self, name: str, script: str) -> tuple[int | None, str]:
        result = await self.driver.exec(name, ["bash", "-c", script])
        return result.exit_code, result.output.decode(errors="replace")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with docker_driver() as (driver, tag):
        yield Env(driver, tag, tmp_path)


def test_container_config_is_hardened() -> None:
    spec = SandboxSpec(task_id="t_x", tenant="acme", image="img", deadline=12.5)
    config = container_config(spec)
    host = config["HostConfig"]
    assert config["User"] == "1001:1001"  # the container's process: the keeper
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True and host["Init"] is True
    assert host["Memory"] == host["MemorySwap"] == 1 << 30
    assert config["Labels"][LABEL_MANAGED] == "1"
    assert config["Labels"][LABEL_DEADLINE] == "12.500"


async def test_hardening_visible_in_inspect(env: Env) -> None:
    spec = env.spec(memory_bytes=256 << 20, nano_cpus=500_000_000, pids_limit=64)
    info = await env.driver.create(spec)
    await env.driver.start(info.name)
    assert info.name == f"sandstream-{spec.task_id}" and not info.adopted
    data = await env.driver.inspect(info.name)
    assert data is not None
    host, config = data["HostConfig"], data["Config"]
    assert data["State"]["Running"] is True
    assert config["User"] == "1001:1001"  # the container's process: the keeper
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"]["/tmp"].startswith("rw,exec,nosuid")
    assert "uid=1000" in host["Tmpfs"]["/workspace"]
    assert host["PidsLimit"] == 64
    assert host["Memory"] == 256 << 20 and host["MemorySwap"] == 256 << 20
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert host["Binds"] == [f"{spec.model_socket_dir}:/run/sandstream:ro"]
    labels = config["Labels"]
    assert labels[LABEL_TASK] == spec.task_id
    assert labels[LABEL_TENANT] == "acme"
    assert float(labels[LABEL_DEADLINE]) == pytest.approx(spec.deadline, abs=0.01)
    assert labels[LABEL_MANAGED] == "1"
    assert labels[TEST_LABEL] == env.tag


async def test_isolation_seen_from_inside(env: Env) -> None:
    name = await env.running()
    code, out = await env.sh(name, "id -u; id -g")
    assert (code, out.split()) == (0, ["1000", "1000"])
    # only the loopback interface exists
    code, out = await env.sh(name, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert (code, out.split()) == (0, ["lo"])
    # no capabilities at all, and no way to gain any
    code, out = await env.sh(name, "grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status")
    assert "CapEff:\t0000000000000000" in out and "NoNewPrivs:\t1" in out
    # read-only root; /workspace and /tmp writable
    code, out = await env.sh(name, "touch /x")
    assert code != 0 and "Read-only file system" in out
    code, out = await env.sh(name, "touch /home/agent/x")
    assert code != 0
    code, out = await env.sh(
        name, "echo a > /workspace/a && echo b > /tmp/b && cat /workspace/a /tmp/b"
    )
    assert (code, out.split()) == (0, ["a", "b"])
    # /tmp allows executing (the CLI needs it)
    code, out = await env.sh(
        name, "printf '#!/bin/sh\\necho ran\\n' > /tmp/s; chmod +x /tmp/s; /tmp/s"
    )
    assert (code, out.strip()) == (0, "ran")
    # nothing resolves, nothing outside is reachable
    code, out = await env.sh(name, "getent hosts example.com")
    assert code != 0
    code, out = await env.sh(name, "exec 3<>/dev/tcp/1.1.1.1/80")
    assert code != 0
    # the host's loopback is not the container's loopback
    port = free_port()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    async with server:
        code, out = await env.sh(name, f"exec 3<>/dev/tcp/127.0.0.1/{port}")
        assert code != 0
    # the model socket directory is mounted read-only
    code, out = await env.sh(name, "touch /run/sandstream/x")
    assert code != 0 and "Read-only" in out


async def test_the_keeper_is_out_of_the_agents_reach(env: Env) -> None:
    """The bookkeeping user: its folder is its own, and the two users cannot touch each
    other's processes (no capabilities on either side)."""
    name = await env.running()
    keeper = "id -u; sleep 30 & echo $!; echo secret >$K/f; wait"
    async with await env.driver.exec_stream(
        name, ["bash", "-c", keeper.replace("$K", KEEPER_DIR)], env={"N": "n"}, keeper=True
    ) as proc:
        lines = proc.lines()
        assert await anext(lines) == str(KEEPER_UID).encode()
        pid = int(await anext(lines))
        _, out = await env.sh(
            name,
            f"ls {KEEPER_DIR}; cat /proc/{pid}/environ; kill {pid}; "
            f"cat /proc/{pid}/cmdline >/dev/null && echo cmdline-readable",
        )
        assert out.count("Permission denied") == 2, out  # its folder, its environment
        assert "Operation not permitted" in out and "cmdline-readable" in out
        await env.driver.kill(name)


async def test_create_twice_gives_one_container(env: Env) -> None:
    since = time.time() - 1
    spec = env.spec()
    first = await env.driver.create(spec)
    again = await env.driver.create(spec)
    assert again.id == first.id and again.adopted and not first.adopted
    # racing creates (two replicas, two deliveries): still one, the rest adopt it
    spec2 = env.spec()
    infos = await asyncio.gather(*(env.driver.create(spec2) for _ in range(5)))
    assert len({i.id for i in infos}) == 1
    assert sum(not i.adopted for i in infos) == 1
    assert len(await env.driver.list(f"{TEST_LABEL}={env.tag}")) == 2
    assert count_container_events(env.tag, "create", since) == 2


async def test_exec_stream_usage_and_removal(env: Env) -> None:
    name = await env.running()
    script = "for i in 1 2 3; do echo line$i; done; echo oops >&2; printf tail; exit 3"
    async with await env.driver.exec_stream(name, ["bash", "-c", script], env={"A": "1"}) as proc:
        lines = [line async for line in proc.lines()]
        code = await proc.wait()
    assert lines == [b"line1", b"line2", b"line3", b"tail"]
    assert code == 3 and proc.stderr == b"oops\n"

    result = await env.driver.exec(
        name, ["bash", "-c", "echo $A $PWD"], env={"A": "x"}, workdir="/tmp"
    )
    assert (result.exit_code, result.output) == (0, b"x /tmp\n")
    missing = await env.driver.exec(name, ["no-such-binary"])
    assert missing.exit_code in (126, 127)

    await env.driver.exec(name, ["bash", "-c", "head -c 50000000 /dev/zero | sha256sum"])
    usage = await env.driver.usage(name)
    assert usage.cpu_seconds > 0 and usage.memory_peak_bytes > 0 and usage.wall_ms > 0
    assert usage.image == sandbox_image()

    await env.driver.kill(name)
    await env.driver.kill(name)  # already stopped: fine
    await env.driver.remove(name)
    await env.driver.remove(name)  # absent: fine
    assert await env.driver.inspect(name) is None
    assert (await env.driver.usage(name)).cpu_seconds == 0


async def test_volume_workspace_is_writable_and_removed(env: Env) -> None:
    spec = env.spec(workspace="volume")
    await env.driver.create(spec)
    await env.driver.start(spec.name)
    code, out = await env.sh(spec.name, "echo hi > /workspace/f && stat -c %u /workspace")
    assert (code, out.strip()) == (0, "1000")
    data = await env.driver.inspect(spec.name)
    assert data is not None
    volumes = [m["Name"] for m in data["Mounts"] if m["Destination"] == "/workspace"]
    await env.driver.remove(spec.name)
    listed = await env.driver.docker.volumes.list()  # type: ignore[no-untyped-call]
    names = {v["Name"] for v in listed["Volumes"] or []}
    assert volumes and volumes[0] not in names


async def test_missing_image_is_permanent(env: Env) -> None:
    with pytest.raises(Permanent) as info:
        await env.driver.create(env.spec(image="sandstream/no-such-image:missing"))
    assert info.value.code == "image_missing"
    assert "no-such-image" in str(info.value)


async def test_unreachable_engine_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        await DockerDriver.connect(f"unix://{tmp_path}/no-docker.sock")


async def test_create_start_timing(env: Env) -> None:
    durations = []
    for _ in range(7):
        spec = env.spec()
        began = time.perf_counter()
        info = await env.driver.create(spec)
        await env.driver.start(info.name)
        durations.append(time.perf_counter() - began)
        await env.driver.remove(info.name)
    median_ms = statistics.median(durations) * 1000
    print(f"\nsandbox create+start median: {median_ms:.0f} ms over {len(durations)}")
    assert median_ms < 2000


async def test_pids_limit_hits_are_counted_during_a_fork_bomb(env: Env) -> None:
    name = await env.running()
    assert await env.driver.pids_limit_hits(name) == 0
    await env.driver.exec(name, ["bash", "-c", "bomb() { bomb | bomb; }; bomb"], detach=True)
    async with asyncio.timeout(30):
        while await env.driver.pids_limit_hits(name) == 0:
            await asyncio.sleep(0.05)
    await env.driver.remove(name)  # removal still works while the bomb holds every pid
    assert await env.driver.inspect(name) is None


async def tar_of(folder: Path) -> AsyncIterator[bytes]:
    proc = await asyncio.create_subprocess_exec(
        "tar", "-c", "-C", str(folder), ".", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(65536):
        yield chunk
    assert await proc.wait() == 0


async def test_copy_in_lands_as_the_agents_and_a_full_workspace_says_so(env: Env) -> None:
    source = env.tmp / "tree"
    (source / "sub").mkdir(parents=True)
    source.chmod(0o700)  # the folder's own mode must not reach /workspace
    (source / "sub" / "a.txt").write_text("a\n")
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    (source / "out").symlink_to("/etc/shadow")
    name = await env.running(workspace_size_bytes=4 * 1024 * 1024)
    await env.driver.copy_in(name, "/workspace", tar_of(source))
    code, out = await env.sh(
        name, "cd /workspace && stat -c '%U %a %n' . sub sub/a.txt run.sh && readlink out"
    )
    assert code == 0, out
    assert out.splitlines() == [
        "agent 755 .",  # /workspace keeps its mode (not the 0700 above): the keeper reads it
        "agent 755 sub",
        "agent 644 sub/a.txt",
        "agent 755 run.sh",
        "/etc/shadow",  # a link stays a link, pointing where it pointed
    ]

    (source / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    with pytest.raises(SandboxError, match="/workspace is full"):
        await env.driver.copy_in(name, "/workspace", tar_of(source))
