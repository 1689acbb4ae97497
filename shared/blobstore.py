"""Object storage for results: one small Protocol, two backends chosen by URL.

- ``file:///abs/dir``: objects are files under ``dir``; every write is atomic and durable
  (temporary name in the same folder, fsync, rename, fsync of the folder).
- ``s3://bucket/prefix``: any S3-compatible store (AWS S3, Cloudflare R2, MinIO) through
  aioboto3. ``endpoint_url`` selects R2/MinIO; credentials and region come from the usual
  ``AWS_*`` environment. Path-style addressing is the default when an endpoint is given; the
  URL may say ``?addressing_style=virtual|path|auto`` and ``?checksum=false`` (for a store that
  rejects ``x-amz-checksum-sha256``).

Keys are relative, ``/``-separated paths (``tasks/<id>/result.json``); a key with an empty,
``.`` or ``..`` segment is a programming error (:class:`ValueError`).

Every failure of the store itself (refused connection, timeout, 5xx, throttling, a missing
bucket, denied access, a full or read-only disk) raises :class:`~shared.errors.Unavailable`
with a message an operator can act on: the caller retries later and acknowledges nothing
before its objects are durable. Credentials never appear in a message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from shared.errors import Unavailable
from shared.events import StoredObject

__all__ = [
    "BlobStore",
    "FileStore",
    "S3Store",
    "StoredObject",
    "open_store",
    "sha256_hex",
]

AddressingStyle: TypeAlias = Literal["path", "virtual", "auto"]
_ADDRESSING: Final = ("path", "virtual", "auto")
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})

# S3 error codes that mean "the store is busy or broken right now".
_THROTTLED: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)
_DENIED: Final = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
        "403",
    }
)


@runtime_checkable
class BlobStore(Protocol):
    """Where results are kept. Every method raises :class:`Unavailable` if the store fails."""

    @property
    def url(self) -> str:
        """The store's own URL (``file:///…`` or ``s3://bucket/prefix``), without secrets."""
        ...

    def url_for(self, key: str) -> str:
        """The URL of one key (or of a folder, for a key ending in ``/``)."""
        ...

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        """Write ``data`` under ``key`` (replacing any object there) and return once durable."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` when there is no such object."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def close(self) -> None:
        """Release connections; the store cannot be used afterwards."""
        ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str, *, folder: bool = False) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`ValueError`."""
    body = key[:-1] if folder and key.endswith("/") else key
    if not body or body.startswith("/") or "\\" in body or "\x00" in body:
        raise ValueError(f"invalid object key {key!r}: must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in body.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segment")
    return key


def _redact(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# ---- file:// -------------------------------------------------------------------------------


class FileStore:
    """Objects as files under one absolute folder; atomic, durable writes."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"file store folder must be absolute, got {str(root)!r}")
        self.root = root

    @property
    def url(self) -> str:
        return "file://" + quote(str(self.root))

    def url_for(self, key: str) -> str:
        check_key(key, folder=True)
        return "file://" + quote(str(self.root / key)) + ("/" if key.endswith("/") else "")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as exc:
            raise Unavailable(
                f"cannot write {key!r} under {self.root}: {exc.strerror or exc} "
                f"({errno.errorcode.get(exc.errno or 0, 'OSError')}); check that the folder "
                "exists, is writable and has space"
            ) from exc
        return StoredObject(key=key, size=len(data), sha256=sha256_hex(data))

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise Unavailable(f"cannot read {key!r} under {self.root}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.is_file)
        except OSError as exc:
            raise Unavailable(f"cannot check {key!r} under {self.root}: {exc}") from exc

    async def close(self) -> None:
        return None

    def _write(self, path: Path, data: bytes) -> None:
        self._make_dirs(path.parent)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        # Results are tenants' data: readable by the services' own user only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def _make_dirs(self, folder: Path) -> None:
        """Create missing folders up to ``folder``; each new entry is made durable too."""
        missing: list[Path] = []
        cursor = folder
        while not cursor.is_dir():
            missing.append(cursor)
            if cursor.parent == cursor:
                break
            cursor = cursor.parent
        for new in reversed(missing):
            try:
                new.mkdir(mode=0o700)
            except FileExistsError:
                if not new.is_dir():
                    raise
            _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- s3:// ---------------------------------------------------------------------------------


class S3Store:
    """Objects in one bucket under a prefix, through one aioboto3 client.

    Build it with :func:`open_store`, which creates the session and client; ``client`` is the
    entered aioboto3 S3 client and ``stack`` closes it.
    """

    def __init__(
        self,
        *,
        client: Any,
        stack: AsyncExitStack,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        checksum: bool = True,
    ) -> None:
        self._client = client
        self._stack = stack
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.checksum = checksum
        self._where = _redact(endpoint_url) if endpoint_url else "the default AWS endpoint"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def url_for(self, key: str) -> str:
        check_key(key, folder=True)
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        digest = hashlib.sha256(data).digest()
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Body": data,
            "ContentType": content_type,
            "Metadata": {"sha256": digest.hex()},
        }
        if self.checksum:
            # The store verifies the body against it and rejects a corrupted upload.
            params["ChecksumSHA256"] = base64.b64encode(digest).decode()
        async with self._errors("write", key):
            await self._client.put_object(**params)
        return StoredObject(key=key, size=len(data), sha256=digest.hex())

    async def get(self, key: str) -> bytes | None:
        async with self._errors("read", key, missing_ok=True) as missing:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data
        assert missing.value
        return None

    async def exists(self, key: str) -> bool:
        async with self._errors("check", key, missing_ok=True) as missing:
            await self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        assert missing.value
        return False

    async def close(self) -> None:
        await self._stack.aclose()

    @contextlib.asynccontextmanager
    async def _errors(self, op: str, key: str, *, missing_ok: bool = False) -> AsyncIterator[_Flag]:
        """Translate client failures into :class:`Unavailable`; a missing key sets the flag."""
        missing = _Flag()
        try:
            yield missing
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if missing_ok and code in ("NoSuchKey", "404", "NotFound"):
                missing.value = True
                return
            message = self._describe(op, key, code, status, str(error.get("Message", "")))
            raise Unavailable(message) from exc
        except NoCredentialsError as exc:
            raise Unavailable(
                f"no S3 credentials to {op} {key!r} in bucket {self.bucket!r}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or another AWS credential source)"
            ) from exc
        except BotoCoreError as exc:
            raise Unavailable(
                f"the object store at {self._where} is unreachable ({type(exc).__name__}) "
                f"while trying to {op} {key!r}; will retry"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise Unavailable(
                f"the object store at {self._where} is unreachable ({type(exc).__name__}) "
                f"while trying to {op} {key!r}; will retry"
            ) from exc

    def _describe(self, op: str, key: str, code: str, status: int, message: str) -> str:
        if code == "NoSuchBucket":
            return (
                f"the bucket {self.bucket!r} does not exist at {self._where}: create it or fix "
                "SANDSTREAM_STORAGE_URL / SANDSTREAM_S3_ENDPOINT_URL; will retry"
            )
        if code in _DENIED or status == 403:
            return (
                f"access denied ({code or status}) to {op} {key!r} in bucket {self.bucket!r} at "
                f"{self._where}: check the AWS_* credentials and the bucket's policy; will retry"
            )
        if code in _THROTTLED or status >= 500 or status == 429:
            return (
                f"the object store at {self._where} is unavailable ({code or 'error'}, HTTP "
                f"{status}) while trying to {op} {key!r}; will retry"
            )
        return (
            f"the object store at {self._where} refused to {op} {key!r} in bucket "
            f"{self.bucket!r} ({code or 'error'}, HTTP {status}: {message}); will retry"
        )


class _Flag:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False


# ---- the factory ---------------------------------------------------------------------------


def _flag(raw: str, name: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"storage URL option {name} must be true or false, got {raw!r}")


async def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    addressing_style: AddressingStyle | None = None,
    connect_timeout: float = 3.0,
    read_timeout: float = 30.0,
    max_attempts: int = 2,
) -> BlobStore:
    """Open the store that ``url`` names (``file:///abs/dir`` or ``s3://bucket/prefix``).

    For S3 one aioboto3 session and client are created here (never at import time); the
    request-level retries are few (``max_attempts``) because the caller retries with backoff.
    Raises :class:`ValueError` for a malformed URL; it does not contact the store, so a store
    that is down shows up as :class:`Unavailable` on first use, not here.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"file storage URL must be file:///absolute/folder, got {url!r}")
        if parts.query:
            raise ValueError(f"file storage URL takes no options, got {url!r}")
        return FileStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if len(bucket) < 3 or "@" in bucket or ":" in bucket:
            raise ValueError(f"S3 storage URL must be s3://bucket/prefix, got {_redact(url)!r}")
        options = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=False).items()}
        unknown = set(options) - {"addressing_style", "checksum"}
        if unknown:
            raise ValueError(f"unknown S3 storage URL option(s): {', '.join(sorted(unknown))}")
        style = options.get("addressing_style") or addressing_style
        if style is None:
            style = "path" if endpoint_url else "auto"
        if style not in _ADDRESSING:
            raise ValueError(f"addressing_style must be one of {_ADDRESSING}, got {style!r}")
        checksum = _flag(options["checksum"], "checksum") if "checksum" in options else True
        return await _open_s3(
            bucket=bucket,
            prefix=unquote(parts.path).strip("/"),
            endpoint_url=endpoint_url,
            style=style,
            checksum=checksum,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )
    raise ValueError(
        f"unsupported storage URL {_redact(url)!r}: use file:///absolute/folder or "
        "s3://bucket/prefix"
    )


async def _open_s3(
    *,
    bucket: str,
    prefix: str,
    endpoint_url: str | None,
    style: str,
    checksum: bool,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
) -> S3Store:
    import aioboto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": style},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max(1, max_attempts)},
        # Only send checksums we ask for: some S3-compatible stores reject the CRC trailers
        # newer botocore adds by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    stack = AsyncExitStack()
    session = aioboto3.Session()
    client = await stack.enter_async_context(
        session.client("s3", endpoint_url=endpoint_url, config=config)
    )
    return S3Store(
        client=client,
        stack=stack,
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint_url,
        checksum=checksum,
    )
