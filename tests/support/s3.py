"""A real S3 API for tests: moto's server on a free loopback port, stoppable and restartable.

Use :func:`fake_aws_env` (with pytest's ``monkeypatch``) so a test's clients get dummy
credentials and no real AWS configuration, and :class:`MotoS3` for the server::

    server = MotoS3(); server.start()
    bucket = await server.create_bucket()       # a unique name per test
    store = await open_store(f"s3://{bucket}/p", endpoint_url=server.endpoint_url)
    server.stop(); ...; server.start()          # the same port, the same buckets

moto keeps its buckets in process-wide memory, so a restarted server still has them, and every
test must use its own bucket names (:func:`unique_bucket`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.procs import free_port

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "sandstream-test-key",
    "AWS_SECRET_ACCESS_KEY": "sandstream-test-secret-never-logged",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Real AWS configuration that must not leak into a test's clients.
_CLEARED = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy credentials and region for this test only; no shared config or metadata lookups."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/sandstream-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/sandstream-test-aws-creds")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return dict(DUMMY_ENV)


def unique_bucket(tag: str = "t") -> str:
    """A fresh valid bucket name (lowercase, 3 to 63 characters)."""
    return f"ss-{tag}-{uuid.uuid4().hex[:16]}".lower()


class MotoS3:
    """moto's threaded S3 server on ``127.0.0.1:<port>``; restartable on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request at INFO; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving and close the listening socket (connections are then refused)."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        """An S3 client of this server, with the dummy credentials (for test set-up/checks)."""
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session(
            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=DUMMY_ENV["AWS_DEFAULT_REGION"],
        )
        config = Config(s3={"addressing_style": "path"})
        async with session.client("s3", endpoint_url=self.endpoint_url, config=config) as client:
            yield client

    async def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique one unless ``name`` is given) and return its name."""
        bucket = name or unique_bucket()
        async with self.client() as client:
            await client.create_bucket(Bucket=bucket)
        return bucket

    async def head(self, bucket: str, key: str) -> dict[str, Any]:
        """The object's metadata as S3 reports it (content type, user metadata, length)."""
        async with self.client() as client:
            response: dict[str, Any] = await client.head_object(Bucket=bucket, Key=key)
        return response

    def __enter__(self) -> MotoS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
