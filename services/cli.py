"""The ``sandstream`` command (sub-commands and flags: docs/api.md, "CLI")."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from shared import settings as settings_mod

SERVICES = ("gateway", "lifecycle", "executor", "storage", "modelproxy")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service (configured by SANDSTREAM_* variables)")

    up = sub.add_parser("up", help="run the whole system on this machine")
    up.add_argument("--data-dir", type=Path)
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    group = up.add_mutually_exclusive_group()
    group.add_argument("--nats-port", type=int, default=4222)
    group.add_argument("--nats-url")

    token = sub.add_parser("token", help="manage API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token; prints it alone on stdout")
    create.add_argument("--tenant", required=True)
    create.add_argument("--tokens-file", type=Path)

    secret = sub.add_parser("secret", help="manage tenant secrets (repository credentials)")
    secret_sub = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    secret_set = secret_sub.add_parser(
        "set",
        help="set a secret from stdin (an empty value deletes it); only the executor reads it",
    )
    secret_set.add_argument("name")
    secret_set.add_argument("--tenant", required=True)
    secret_set.add_argument("--secrets-file", type=Path)
    secret_set.add_argument("--host", default="", help="the only host it is sent to (https)")

    nats_config = sub.add_parser(
        "nats-config",
        help="write a nats-server config and one nkey seed per component (for your own NATS)",
    )
    nats_config.add_argument("--dir", type=Path, required=True, help="where to write them")
    nats_config.add_argument("--listen", default="127.0.0.1:4222", help="HOST:PORT to serve")
    nats_config.add_argument("--store-dir", default="/data", help="the server's JetStream store")

    submit = sub.add_parser("submit", help="submit a task")
    submit.add_argument("prompt")
    submit.add_argument("--wait", action="store_true", help="follow the task until it ends")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--timeout-s", type=int)
    submit.add_argument(
        "--follow-up", metavar="TASK_ID", help="go on from an ended task's workspace and session"
    )
    submit.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="show a task")
    status.add_argument("task_id")
    status.add_argument("--json", action="store_true")

    tasks = sub.add_parser("tasks", help="list your tasks")
    tasks.add_argument("--limit", type=int, default=50)
    tasks.add_argument("--json", action="store_true")

    events = sub.add_parser("events", help="show a task's events (SSE)")
    events.add_argument("task_id")
    events.add_argument("--follow", action="store_true")

    replay = sub.add_parser("replay", help="read the event log directly from NATS")
    replay.add_argument("task_id", nargs="?")
    replay.add_argument("--from-seq", type=int)
    replay.add_argument("--since", type=_iso_time)
    replay.add_argument("--type", dest="event_type")
    replay.add_argument("--json", action="store_true")
    return p


def _iso_time(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {raw!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-01-02T03:04:05Z")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in SERVICES:
        module = importlib.import_module(f"services.{args.command}.__main__")
        sys.exit(module.main() or 0)
    if args.command == "up":
        from services.up import run_up

        sys.exit(run_up(args))
    if args.command == "token":
        _token_create(args)
        return
    if args.command == "secret":
        _secret_set(args)
        return
    if args.command == "nats-config":
        _nats_config(args)
        return
    from services import client
    from shared import logging as logging_mod

    logging_mod.configure("WARNING")  # client commands: stdout is for results only

    command = client.replay if args.command == "replay" else client.run
    sys.exit(_as_unix_tool(lambda: asyncio.run(command(args))))


def _as_unix_tool(run: Callable[[], int]) -> int:
    """Run a client command; a reader that went away or Ctrl-C end it quietly.

    ``sandstream replay --json | head -1`` closes the pipe after one line: that is success, not
    a traceback. Ctrl-C is the normal way to leave ``events --follow``: exit 130, no traceback.
    """
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _nats_config(args: argparse.Namespace) -> None:
    from shared import identities

    base = settings_mod.load()
    scope = identities.Scope(base.stream, base.subject_prefix, base.consumer_prefix)
    conf = identities.provision(args.dir, scope, listen=args.listen, store_dir=Path(args.store_dir))
    names = ", ".join(f"{name}.nk" for name in identities.COMPONENTS)
    print(f"wrote {conf} and the seeds {names} (0600) in {args.dir}", file=sys.stderr)


def _token_create(args: argparse.Namespace) -> None:
    from shared.tokens import create_token

    path = args.tokens_file or settings_mod.load().tokens_path
    try:
        token = create_token(path, args.tenant)
    except ValueError as exc:
        print(f"sandstream: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"created a token for tenant {args.tenant!r} in {path}", file=sys.stderr)
    print(token)


def _secret_set(args: argparse.Namespace) -> None:
    from shared.secrets import set_secret

    path = args.secrets_file or settings_mod.load().secrets_path
    value = sys.stdin.read().removesuffix("\n")
    try:
        set_secret(path, args.tenant, args.name, value, host=args.host)
    except ValueError as exc:
        print(f"sandstream: {exc}", file=sys.stderr)
        sys.exit(2)
    done = "deleted" if not value else "set"
    print(f"{done} secret {args.name!r} of tenant {args.tenant!r} in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
