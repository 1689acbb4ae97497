"""compose.yaml is a valid Compose file (checked by docker-compose itself, offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def test_compose_file_is_valid(repo_root: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make test installs it)")
    done = subprocess.run(
        [tool, "-f", str(repo_root / "compose.yaml"), "config", "--services"],
        env={**os.environ, "MINIO_ROOT_PASSWORD": "check-only"},
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
