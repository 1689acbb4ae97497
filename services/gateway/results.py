"""The gateway's object store: stored results (with a small cache: they do not change), and
the inputs of tasks it accepts (their inline files)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
import structlog

from shared import events as ev
from shared import results
from shared.blobstore import BlobStore, open_store, sha256_hex
from shared.errors import Unavailable
from shared.inputs import input_key
from shared.settings import Settings

log = structlog.get_logger("sandstream.gateway")


class ResultReader:
    def __init__(self, settings: Settings, *, cache_size: int = 1024) -> None:
        self.settings = settings
        self.cache_size = cache_size
        self._store: BlobStore | None = None
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def open(self) -> None:
        self._store = await open_store(
            self.settings.results_url, endpoint_url=self.settings.s3_endpoint_url
        )

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def store_input(self, data: bytes) -> ev.StoredObject:
        """Store a task's input tar under its sha256 (the same files, the same object)."""
        assert self._store is not None, "ResultReader.open() was not called"
        key = input_key(sha256_hex(data))
        try:
            return await self._store.put(key, data, "application/x-tar")
        except Unavailable as exc:
            log.warning("result store unavailable", key=key, error=str(exc))
            raise Unavailable("the object store cannot be reached; retry shortly") from None

    async def object(self, key: str) -> bytes | None:
        """One stored object's bytes, or ``None`` if it is not there (not cached: a bundle
        can be large). :class:`~shared.errors.Unavailable` when the store cannot be reached."""
        assert self._store is not None, "ResultReader.open() was not called"
        try:
            return await self._store.get(key)
        except Unavailable as exc:
            log.warning("result store unavailable", key=key, error=str(exc))
            raise Unavailable("the result store cannot be reached; retry shortly") from None

    async def get(self, task_id: str) -> dict[str, Any] | None:
        """``result.json`` of a task as a JSON object, or ``None`` if it is not stored.

        Raises :class:`~shared.errors.Unavailable` when the store cannot be reached.
        """
        if (hit := self._cache.get(task_id)) is not None:
            self._cache.move_to_end(task_id)
            return hit
        assert self._store is not None, "ResultReader.open() was not called"
        try:
            raw = await self._store.get(results.result_key(task_id))
        except Unavailable as exc:
            # The cause names a host path or an endpoint: for the log, not for clients.
            log.warning("result store unavailable", task_id=task_id, error=str(exc))
            raise Unavailable("the result store cannot be reached; retry shortly") from None
        if raw is None:
            return None
        data: dict[str, Any] = msgspec.json.decode(raw)
        self._cache[task_id] = data
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return data
