"""The BlobStore contract, the same tests over file:// and s3:// (moto's real S3 API)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.blobstore import BlobStore, FileStore, S3Store, open_store
from shared.errors import Unavailable
from tests.support.procs import free_port
from tests.support.s3 import DUMMY_ENV, MotoS3, fake_aws_env, unique_bucket


@dataclass
class Case:
    kind: str
    store: BlobStore
    root: Path | None = None
    bucket: str | None = None


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    """One S3 server for the contract tests (they never stop it); buckets are per test."""
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return fake_aws_env(monkeypatch)


@pytest.fixture(params=["file", "s3"])
async def case(
    request: pytest.FixtureRequest, tmp_path: Path, moto: MotoS3, aws_env: dict[str, str]
) -> AsyncIterator[Case]:
    if request.param == "file":
        root = tmp_path / "results"
        store = await open_store(f"file://{root}")
        yield Case("file", store, root=root)
    else:
        bucket = await moto.create_bucket()
        store = await open_store(f"s3://{bucket}/some/prefix", endpoint_url=moto.endpoint_url)
        yield Case("s3", store, bucket=bucket)
    await store.close()


# ---- the contract, for both backends ------------------------------------------------------


async def test_put_get_exists_and_sha256(case: Case) -> None:
    data = b'{"hello": "world"}\n'
    stored = await case.store.put("tasks/t_1/result.json", data, "application/json")
    assert stored.key == "tasks/t_1/result.json"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await case.store.get("tasks/t_1/result.json") == data
    assert await case.store.exists("tasks/t_1/result.json")


async def test_missing_objects(case: Case) -> None:
    assert await case.store.get("tasks/nothing/here.json") is None
    assert not await case.store.exists("tasks/nothing/here.json")


async def test_overwrite_replaces_the_object(case: Case) -> None:
    await case.store.put("a/b.txt", b"first version, longer", "text/plain")
    stored = await case.store.put("a/b.txt", b"second", "text/plain")
    assert await case.store.get("a/b.txt") == b"second"
    assert stored.size == 6


async def test_empty_binary_and_large_objects(case: Case) -> None:
    blobs = {
        "x/empty": b"",
        "x/binary": bytes(range(256)) * 4,
        "x/large": os.urandom(3 * 1024 * 1024),
    }
    for key, data in blobs.items():
        stored = await case.store.put(key, data)
        assert stored.sha256 == hashlib.sha256(data).hexdigest()
    for key, data in blobs.items():
        assert await case.store.get(key) == data


async def test_concurrent_puts(case: Case) -> None:
    keys = [f"tasks/t_c/{i}.txt" for i in range(20)]
    stored = await asyncio.gather(*(case.store.put(k, k.encode()) for k in keys))
    assert [s.key for s in stored] == keys
    for key in keys:
        assert await case.store.get(key) == key.encode()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/.", "a\\b", "a/\x00"])
async def test_unsafe_keys_are_refused(case: Case, key: str) -> None:
    with pytest.raises(ValueError):
        await case.store.put(key, b"x")
    with pytest.raises(ValueError):
        await case.store.get(key)


async def test_urls_name_the_store_and_the_folder(case: Case) -> None:
    if case.kind == "file":
        assert case.store.url == f"file://{case.root}"
        assert case.store.url_for("tasks/t_1/") == f"file://{case.root}/tasks/t_1/"
    else:
        assert case.store.url == f"s3://{case.bucket}/some/prefix"
        assert case.store.url_for("tasks/t_1/") == f"s3://{case.bucket}/some/prefix/tasks/t_1/"


# ---- file:// ---------------------------------------------------------------------------


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_file_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = await open_store(f"file://{tmp_path}/r")
    for i in range(10):
        await store.put(f"tasks/t_{i % 3}/result.json", f"{i}".encode())
    assert _all_files(tmp_path / "r") == [f"tasks/t_{i}/result.json" for i in range(3)]


async def test_file_failed_write_keeps_the_old_object_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(f"file://{tmp_path}")
    await store.put("k/obj", b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(Unavailable, match="cannot write 'k/obj'"):
        await store.put("k/obj", b"new content that never becomes visible")
    monkeypatch.undo()
    assert await store.get("k/obj") == b"old"
    assert _all_files(tmp_path) == ["k/obj"]


async def test_file_store_refusing_writes_is_unavailable_until_fixed(tmp_path: Path) -> None:
    root = tmp_path / "results"
    store = await open_store(f"file://{root}")
    root.mkdir()
    blocker = root / "tasks"
    blocker.write_bytes(b"not a folder")  # works as root too, unlike a read-only mode
    with pytest.raises(Unavailable, match="cannot write"):
        await store.put("tasks/t_1/result.json", b"{}")
    blocker.unlink()
    await store.put("tasks/t_1/result.json", b"{}")
    assert _all_files(root) == ["tasks/t_1/result.json"]


async def test_file_store_creates_its_folder(tmp_path: Path) -> None:
    store = await open_store(f"file://{tmp_path}/deep/er/results")
    assert isinstance(store, FileStore)
    await store.put("a", b"1")
    assert (tmp_path / "deep/er/results/a").read_bytes() == b"1"


# ---- s3:// -----------------------------------------------------------------------------


async def test_s3_object_has_content_type_and_sha256(moto: MotoS3, aws_env: dict[str, str]) -> None:
    bucket = await moto.create_bucket()
    store = await open_store(f"s3://{bucket}/pre", endpoint_url=moto.endpoint_url)
    try:
        data = b'{"a": 1}'
        await store.put("tasks/t_1/result.json", data, "application/json")
        head = await moto.head(bucket, "pre/tasks/t_1/result.json")
        assert head["ContentType"] == "application/json"
        assert head["ContentLength"] == len(data)
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        await store.close()


async def test_s3_without_prefix_and_without_checksum_header(
    moto: MotoS3, aws_env: dict[str, str]
) -> None:
    bucket = await moto.create_bucket()
    store = await open_store(f"s3://{bucket}?checksum=false", endpoint_url=moto.endpoint_url)
    try:
        assert isinstance(store, S3Store) and not store.checksum
        assert store.url == f"s3://{bucket}"
        await store.put("k", b"v")
        head = await moto.head(bucket, "k")
        assert head["Metadata"]["sha256"] == hashlib.sha256(b"v").hexdigest()
    finally:
        await store.close()


async def test_s3_server_down_is_unavailable_then_recovers(aws_env: dict[str, str]) -> None:
    server = MotoS3()
    server.start()
    try:
        bucket = await server.create_bucket()
        store = await open_store(f"s3://{bucket}", endpoint_url=server.endpoint_url)
        await store.put("k", b"1")
        server.stop()
        began = time.monotonic()
        with pytest.raises(Unavailable, match="unreachable") as info:
            await store.put("k", b"2")
        assert time.monotonic() - began < 5
        with pytest.raises(Unavailable):
            await store.get("k")
        server.start()  # same port; moto keeps its buckets in memory
        await store.put("k", b"3")
        assert await store.get("k") == b"3"
        await store.close()
    finally:
        server.stop()
    assert DUMMY_ENV["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
    assert DUMMY_ENV["AWS_ACCESS_KEY_ID"] not in str(info.value)


async def test_s3_nothing_listening_is_unavailable(aws_env: dict[str, str]) -> None:
    store = await open_store("s3://nobody-home", endpoint_url=f"http://127.0.0.1:{free_port()}")
    try:
        began = time.monotonic()
        with pytest.raises(Unavailable, match="unreachable"):
            await store.put("k", b"1")
        assert time.monotonic() - began < 5
    finally:
        await store.close()


async def test_s3_missing_bucket_is_unavailable_with_a_clear_message(
    moto: MotoS3, aws_env: dict[str, str]
) -> None:
    bucket = unique_bucket("missing")
    store = await open_store(f"s3://{bucket}/p", endpoint_url=moto.endpoint_url)
    try:
        with pytest.raises(Unavailable, match=f"bucket '{bucket}' does not exist") as info:
            await store.put("k", b"1")
        assert DUMMY_ENV["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
        await moto.create_bucket(bucket)  # the operator fixes it: the same store works
        await store.put("k", b"1")
        assert await store.get("k") == b"1"
    finally:
        await store.close()


async def test_endpoint_credentials_never_appear_in_messages(aws_env: dict[str, str]) -> None:
    port = free_port()
    store = await open_store("s3://bkt", endpoint_url=f"http://user:hunter2@127.0.0.1:{port}")
    try:
        with pytest.raises(Unavailable) as info:
            await store.put("k", b"1")
        assert "hunter2" not in str(info.value)
    finally:
        await store.close()


# ---- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file://relative/dir",
        "file:relative",
        "file:///abs?x=1",
        "s3://",
        "s3://ab/prefix",
        "s3://bucket/p?addressing_style=sideways",
        "s3://bucket/p?checksum=maybe",
        "s3://bucket/p?unknown=1",
        "gs://bucket/p",
        "/just/a/path",
    ],
)
async def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        await open_store(url)


async def test_s3_addressing_style_defaults(aws_env: dict[str, str]) -> None:
    with_endpoint = await open_store("s3://bucket/p", endpoint_url="http://127.0.0.1:1")
    aws = await open_store("s3://bucket/p")
    virtual = await open_store(
        "s3://bucket/p?addressing_style=virtual", endpoint_url="http://127.0.0.1:1"
    )
    try:
        styles = [
            s._client.meta.config.s3["addressing_style"]  # type: ignore[attr-defined]
            for s in (with_endpoint, aws, virtual)
        ]
        assert styles == ["path", "auto", "virtual"]
    finally:
        for s in (with_endpoint, aws, virtual):
            await s.close()
