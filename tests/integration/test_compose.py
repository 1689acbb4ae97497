"""compose.yaml is a valid Compose file (checked by docker-compose itself, offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs needed for two loads

SECRETS = {
    "MINIO_ROOT_PASSWORD": "check-only",
    "STORAGE_S3_SECRET": "storage-only",
    "GATEWAY_S3_SECRET": "gateway-only",
}


def compose_config(repo_root: Path) -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    if tool is None:  # a failure in make test, which installs it (SANDSTREAM_NO_SKIPS)
        pytest.skip("docker-compose is not installed (make test installs it)")
    done = subprocess.run(
        [tool, "-f", str(repo_root / "compose.yaml"), "config"],
        env={**os.environ, **SECRETS}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_keeps_each_secret_with_its_user(repo_root: Path) -> None:
    services = compose_config(repo_root)["services"]
    # NATS requires the components' identities; no monitoring port.
    assert services["nats"]["command"] == ["-c", "/etc/nats/server.conf"]
    for name in ("gateway", "lifecycle", "executor", "storage"):
        env = services[name]["environment"]
        assert env["SANDSTREAM_NATS_NKEY"] == f"/run/secrets/{name}_nkey"
        assert [s["source"] for s in services[name]["secrets"]] == [f"{name}_nkey"]
        # the MinIO root credential reaches no service
        assert "check-only" not in str(env)
        # the model credential reaches no bus service
        assert "ANTHROPIC_API_KEY" not in env
    assert services["storage"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "storage-only"
    assert services["gateway"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "gateway-only"
    assert "AWS_SECRET_ACCESS_KEY" not in services["lifecycle"]["environment"]
    # the gateway is published on loopback only (TLS belongs to a proxy in front)
    (port,) = services["gateway"]["ports"]
    assert str(port).startswith("127.0.0.1:"), port
    # the model proxy: the credential, the sockets and the executor's control socket, no
    # Docker socket, no bus identity, the sandbox's uid
    proxy = services["modelproxy"]
    assert "ANTHROPIC_API_KEY" in proxy["environment"] and "secrets" not in proxy
    assert proxy["user"] == "1000:1000"
    assert not any("docker.sock" in str(v) for v in proxy["volumes"])
    assert not any("/var/lib/sandstream/model" in str(v) for v in services["executor"]["volumes"])
    # every image pinned to a release
    for name in ("nats", "minio", "minio-bucket"):
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")


def test_compose_file_is_valid(repo_root: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make test installs it)")
    done = subprocess.run(
        [tool, "-f", str(repo_root / "compose.yaml"), "config", "--services"],
        env={**os.environ, **SECRETS},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) >= {
        "nats",
        "minio",
        "gateway",
        "lifecycle",
        "executor",
        "storage",
    }


def test_compose_refuses_to_start_without_a_minio_password(repo_root: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make test installs it)")
    env = {k: v for k, v in os.environ.items() if k != "MINIO_ROOT_PASSWORD"}
    done = subprocess.run(
        [tool, "-f", str(repo_root / "compose.yaml"), "config", "-q"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "MINIO_ROOT_PASSWORD" in done.stderr
