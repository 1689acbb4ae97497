"""``python -m services.modelproxy`` (and ``sandstream modelproxy``): the model proxy service,
with the tasks' egress proxy (``egress.py``) in the same unprivileged process.

The only process with the model credential (``ANTHROPIC_API_KEY`` or
``CLAUDE_CODE_OAUTH_TOKEN``), and the only one that parses HTTP written by agents. It has no
bus identity and no Docker access. Started as root (``up`` as root), it binds its control
socket, makes the socket folder its own, then becomes the sandbox's uid for good (no
supplementary groups, so not the ``docker`` group either) before it serves a single request.
It works inside the socket folder by relative paths, so the private data dir above it stays
closed to it. A restarted proxy listens again on every socket the previous one left.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import structlog

from services.modelproxy.control import serve_control
from services.modelproxy.egress import EgressLimits, EgressProxy
from services.modelproxy.policy import Prices, ProxyPolicy
from services.modelproxy.proxy import Credential, ModelProxy
from shared import egress, service
from shared.sandbox import SANDBOX_UID
from shared.settings import Settings

log = structlog.get_logger("sandstream.modelproxy")


def drop_privileges(uid: int = SANDBOX_UID) -> None:
    """As root: become ``uid`` and its group, with no supplementary groups, irreversibly."""
    if os.geteuid() != 0:
        log.warning(
            "model proxy keeps the rights of the user that started it: start it as root "
            "and it runs as the sandbox's uid, without the Docker group",
            uid=os.geteuid(),
        )
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def policy(settings: Settings) -> ProxyPolicy:
    """The proxy's limits from the settings; a price table that does not parse exits."""
    try:
        Prices.parse(settings.model_prices)
    except ValueError as exc:
        raise SystemExit(f"SANDSTREAM_MODEL_PRICES: {exc}") from None
    return ProxyPolicy(
        max_body_bytes=settings.max_model_body_bytes,
        max_connections=settings.max_model_connections,
        allowed_models=settings.allowed_models,
        allow_server_tools=settings.allow_server_tools,
        prices=settings.model_prices,
    )


def own_socket_dir(socket_dir: Path) -> None:
    """Create the folder of the task sockets; as root, hand it to the sandbox's uid, 0700."""
    socket_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(socket_dir, SANDBOX_UID, SANDBOX_UID)
    os.chmod(socket_dir, 0o700)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve task sockets and the control socket until ``stop`` or SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    credential = Credential.from_env()
    socket_dir = settings.model_socket_dir.resolve()
    control_path = settings.model_proxy_socket.resolve()
    own_socket_dir(socket_dir)
    os.chdir(socket_dir)
    control_path.parent.mkdir(parents=True, exist_ok=True)
    async with service.lifetime("model proxy", stop) as life:
        proxy = ModelProxy(
            socket_dir=Path("."),
            upstream=settings.model_upstream,
            credential=credential,
            policy=policy(settings),
            egress=EgressProxy(
                socket_dir=Path("."),
                presets=egress.parse_presets(settings.egress_presets),
                pins=egress.parse_pins(settings.egress_hosts),
                limits=EgressLimits(
                    max_connections=settings.egress_max_connections,
                    max_bytes=settings.egress_max_bytes,
                ),
            ),
        )
        control = await serve_control(proxy, control_path)
        life.closing(control.cleanup)
        # What would be imported lazily later is loaded now, while the interpreter's own
        # files are still readable (a root-only Python install): the thread pool and the
        # IDNA codec that name resolution goes through, TLS defaults for an https upstream.
        await loop.getaddrinfo("localhost", None)
        "upstream".encode("idna")
        ssl.create_default_context()
        drop_privileges()
        await proxy.start()
        life.closing(proxy.close)
        adopted = await proxy.adopt_existing()
        await life.run(
            upstream=settings.model_upstream,
            credential=credential.kind if credential else "none",
            sockets=str(socket_dir),
            control=str(control_path),
            uid=os.getuid(),
            adopted=len(adopted),
        )


def main() -> int:
    return service.run("modelproxy", serve)


if __name__ == "__main__":
    raise SystemExit(main())
