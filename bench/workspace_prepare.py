"""Preparing a task's workspace from a repository, next to a plain ``git clone`` on the host.

Two local bare repositories: a small one (a few source files) and a large one (``--mb`` MB of
incompressible files, so the pack is that big). For each, medians of ``--runs``:

- ``git clone``: a plain ``git clone -q file://…`` on the host (the bare baseline);
- ``fetch``: what the executor does on its side (``Fetcher.fetch``: init, fetch the ref,
  check it out, with the size watch);
- ``copy in``: the checkout streamed into a fresh hardened sandbox (``DockerDriver.copy_in``);
- ``prepare``: fetch + copy in, the time from ``SandboxStarted`` to ``WorkspacePrepared``.

Needs Docker and the sandbox image (``make image``).

    .venv/bin/python bench/workspace_prepare.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.executor.workspace import Fetcher, tar_stream  # noqa: E402
from shared import events as ev  # noqa: E402
from shared.sandbox import WORKSPACE, DockerDriver, SandboxSpec  # noqa: E402
from shared.settings import DEFAULT_IMAGE  # noqa: E402
from tests.support.git import git, make_repo  # noqa: E402


def big_repo(root: Path, mb: int) -> Path:
    work = root / "big-work"
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work))
    for i in range(mb):
        (work / f"blob{i:03d}.bin").write_bytes(os.urandom(1024 * 1024))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "big", cwd=work)
    bare = root / "big.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    shutil.rmtree(work)
    return bare


def ms(began: float) -> float:
    return (time.perf_counter() - began) * 1000


async def measure(driver: DockerDriver, tmp: Path, bare: Path, runs: int) -> dict[str, float]:
    figures: dict[str, list[float]] = {"clone": [], "fetch": [], "copy": [], "prepare": []}
    fetcher = Fetcher(
        root=tmp / "workspaces",
        secrets_path=tmp / "secrets",
        max_bytes=4 * 1024**3,
        timeout_s=600,
        allow_file=True,
    )
    sockets = tmp / "sockets"
    sockets.mkdir(exist_ok=True)
    for _ in range(runs):
        target = tmp / "plain"
        began = time.perf_counter()
        subprocess.run(["git", "clone", "-q", f"file://{bare}", str(target)], check=True)
        figures["clone"].append(ms(began))
        shutil.rmtree(target)

        task = ev.new_task_id()
        spec = SandboxSpec(
            task_id=task,
            tenant="bench",
            image=DEFAULT_IMAGE,
            deadline=time.time() + 600,
            workspace_size_bytes=2 * 1024**3,
            labels={"sandstream.bench": "1"},
        )
        info = await driver.create(spec)
        await driver.start(info.name)
        try:
            began = time.perf_counter()
            checkout = await fetcher.fetch(task, "bench", ev.RepoSpec(url=f"file://{bare}"))
            fetched = time.perf_counter()
            await driver.copy_in(info.name, WORKSPACE, tar_stream(checkout.path))
            figures["fetch"].append((fetched - began) * 1000)
            figures["copy"].append(ms(fetched))
            figures["prepare"].append(ms(began))
        finally:
            fetcher.discard(task)
            await driver.remove(info.name)
    return {name: statistics.median(values) for name, values in figures.items()}


async def main_async(mb: int, runs: int) -> None:
    driver = await DockerDriver.connect()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            small = make_repo(
                tmp / "repos", "small", {f"src/m{i}.py": f"x = {i}\n" for i in range(20)}
            )
            big = big_repo(tmp / "repos", mb)
            print(f"medians of {runs} runs; ms")
            head = ("repository", "git clone", "fetch", "copy in", "prepare", "ratio")
            print("{:>22} {:>10} {:>8} {:>8} {:>8} {:>6}".format(*head))
            for label, bare in (("small (20 files)", small), (f"large ({mb} MB)", big)):
                f = await measure(driver, tmp, bare, runs)
                ratio = f["prepare"] / f["clone"]
                print(
                    f"{label:>22} {f['clone']:>10.0f} {f['fetch']:>8.0f} {f['copy']:>8.0f} "
                    f"{f['prepare']:>8.0f} {ratio:>5.2f}x"
                )
    finally:
        await driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.mb, args.runs))


if __name__ == "__main__":
    main()
