"""Bearer tokens: the tokens file holds only their SHA-256 hashes, each mapped to a tenant.

File format: one JSON object per line, ``{"hash": "sha256:<hex>", "tenant": "acme",
"created_at": "..."}``. ``sandstream token create`` appends to it; the gateway re-reads it
whenever its modification time changes, without a restart: a token it does not know makes it
look at once (a new token works at once), a known one at most once a second
(:data:`RECHECK_S`; a removed token stops working within that second).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog

log = structlog.get_logger("sandstream.tokens")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RECHECK_S = 1.0
"""How long a known token is taken on the file's word without looking at the file again."""


class TokenEntry(msgspec.Struct, frozen=True):
    hash: str
    tenant: str
    created_at: str = ""


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def create_token(tokens_file: Path, tenant: str) -> str:
    """Make a new token for ``tenant``, append its hash to the file (mode 0600), return it."""
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(
            "tenant must be 1-63 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit"
        )
    token = "sst_" + secrets.token_urlsafe(32)
    entry = TokenEntry(hash_token(token), tenant, datetime.now(UTC).isoformat())
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, msgspec.json.encode(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


class TokenStore:
    """Looks tokens up by hash; re-reads the file when its modification time changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._by_hash: dict[str, str] = {}
        self._mtime: float | None = None
        self._decoder = msgspec.json.Decoder(TokenEntry)
        self._clock = clock
        self._checked_at = -RECHECK_S

    def _refresh(self) -> None:
        self._checked_at = self._clock()
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._by_hash, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries: dict[str, str] = {}
        for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = self._decoder.decode(line)
            except msgspec.DecodeError as exc:
                # One bad line must not lock every tenant out; its content is never logged.
                log.error(
                    "tokens file line ignored",
                    path=str(self.path),
                    line=number,
                    error=str(exc)[:80],
                )
                continue
            entries[entry.hash] = entry.tenant
        self._by_hash, self._mtime = entries, mtime

    def tenant_for(self, token: str) -> str | None:
        """The tenant owning ``token``, or ``None``.

        Tokens are never compared directly: the lookup is by the token's SHA-256, so any
        timing difference can only tell an attacker about a hash of their own guess.
        """
        digest = hash_token(token)
        if self._clock() - self._checked_at >= RECHECK_S or digest not in self._by_hash:
            self._refresh()
        return self._by_hash.get(digest)
