"""Settings from the environment: defaults, parsing, and clear errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import load


def test_defaults() -> None:
    settings = load({})
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.results_url.startswith("file:///") and settings.results_url.endswith("results")
    assert (settings.sandbox_memory_mb, settings.sandbox_cpus, settings.sandbox_pids) == (
        1024,
        1.0,
        256,
    )


def test_values_are_read() -> None:
    settings = load({
        "SANDSTREAM_PORT": "9000",
        "SANDSTREAM_STORAGE_URL": "s3://bucket/p",
        "SANDSTREAM_SANDBOX_CPUS": "0.5",
        "SANDSTREAM_INSTANCE": "up-1",
        "SANDSTREAM_STORE_MAX_DELIVER": "12",
        "SANDSTREAM_MAX_WAITING": "100",
    })  # fmt: skip
    assert settings.port == 9000 and settings.results_url == "s3://bucket/p"
    assert settings.sandbox_cpus == 0.5 and settings.instance == "up-1"
    assert (settings.store_max_deliver, settings.max_waiting) == (12, 100)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SANDSTREAM_PORT", "eighty", "SANDSTREAM_PORT must be an integer"),
        ("SANDSTREAM_ACK_WAIT_S", "soon", "SANDSTREAM_ACK_WAIT_S must be a number"),
        ("SANDSTREAM_SANDBOX_MEMORY_MB", "8", "SANDSTREAM_SANDBOX_MEMORY_MB must be at least 64"),
        ("SANDSTREAM_SANDBOX_PIDS", "2", "SANDSTREAM_SANDBOX_PIDS must be at least 16"),
        ("SANDSTREAM_SANDBOX_CPUS", "0", "SANDSTREAM_SANDBOX_CPUS must be at least 0.01"),
        ("SANDSTREAM_WARM_POOL_SIZE", "-1", "SANDSTREAM_WARM_POOL_SIZE must be at least 0"),
        ("SANDSTREAM_WARM_POOL_SIZE", "65", "SANDSTREAM_WARM_POOL_SIZE must be at most 64"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load({name: value})


def test_the_sandbox_ca_file_is_checked_when_the_executor_starts(tmp_path: Path) -> None:
    from services.executor.service import ExecutorConfig
    from tests.support.tls import self_signed

    cert, _ = self_signed(tmp_path, "mirror.test")
    good = load({"SANDSTREAM_SANDBOX_CA_FILE": str(cert)})
    assert ExecutorConfig.of(good).sandbox_ca == cert.read_bytes()
    assert ExecutorConfig.of(load({})).sandbox_ca is None
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for path, says in ((junk, "holds no PEM certificates"), (tmp_path / "none", "cannot be read")):
        with pytest.raises(SystemExit, match=f"SANDSTREAM_SANDBOX_CA_FILE: .*{says}"):
            ExecutorConfig.of(load({"SANDSTREAM_SANDBOX_CA_FILE": str(path)}))
