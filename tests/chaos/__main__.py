"""``python -m tests.chaos`` (``make chaos``): the chaos run from the command line.

Exit status: 0 when every check passed, 1 when one failed, 2 when the run cannot happen
here (no Docker engine or no sandbox image).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from shared import logging as slog
from tests.chaos.run import ChaosConfig, run
from tests.chaos.system import S3, SERVICES, docker_problem


def parse(argv: list[str] | None = None) -> ChaosConfig:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Start Sandstream from its parts, kill them while tasks run, audit.",
    )
    p.add_argument("--tasks", type=int, default=60, help="tasks in the batch (default 60)")
    p.add_argument(
        "--kill-every",
        type=float,
        default=3.0,
        metavar="S",
        help="mean seconds between kills, jittered ±40%% (default 3)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--max-concurrent", type=int, default=5, help="sandboxes at once (default 5)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="bound on the whole run in seconds, at least 60 (default 600)",
    )
    p.add_argument(
        "--ack-wait", type=float, default=4.0, metavar="S", help="SANDSTREAM_ACK_WAIT_S (4)"
    )
    p.add_argument("--nats-restarts", type=int, default=1, help="nats-server restarts (default 1)")
    p.add_argument(
        "--storage",
        choices=("s3", "file"),
        default="s3",
        help="results to moto's S3 server, its own process and killed too (default), or files",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help=f"comma-separated parts to kill among {', '.join((*SERVICES, S3))} "
        "(default: all of them; s3 only with --storage s3)",
    )
    p.add_argument(
        "--warm-pool", type=int, default=2, help="SANDSTREAM_WARM_POOL_SIZE (default 2, as up)"
    )
    p.add_argument("--keep", action="store_true", help="keep the run's folder even on success")
    a = p.parse_args(argv)
    targets = None if a.only is None else tuple(n for n in a.only.split(",") if n)
    parts = (*SERVICES, S3) if a.storage == "s3" else SERVICES
    if targets is not None and not set(targets) <= set(parts):
        p.error(f"--only takes names among {', '.join(parts)}")
    if a.tasks < 1 or a.kill_every <= 0 or a.max_concurrent < 1:
        p.error("--tasks, --max-concurrent and --kill-every must be positive")
    if a.timeout < 60:
        p.error("--timeout must be at least 60 seconds (the audit needs some of it)")
    return ChaosConfig(
        tasks=a.tasks,
        kill_every=a.kill_every,
        seed=a.seed,
        max_concurrent=a.max_concurrent,
        timeout=a.timeout,
        ack_wait=a.ack_wait,
        nats_restarts=a.nats_restarts,
        storage=a.storage,
        targets=targets,
        warm_pool=a.warm_pool,
        keep=a.keep,
    )


def quiet() -> None:
    """Only errors from this process's own libraries: the run prints its own progress.

    The fake model's server logs a traceback each time a killed executor cuts a reply short;
    that is the chaos working, not a problem.
    """
    slog.configure("ERROR")
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    problem = docker_problem()
    if problem is not None:
        print(f"chaos: cannot run here: {problem}", file=sys.stderr)
        return 2
    quiet()
    report = asyncio.run(run(config))
    print(report.summary(), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
