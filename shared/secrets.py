"""Tenant secrets (repository credentials), kept in one file that only the executor reads.

File format: one JSON object per line, ``{"tenant": "acme", "name": "gh", "value": "...",
"set_at": "..."}``; the last line for a (tenant, name) wins, an empty value deletes it.
``sandstream secret set --tenant T NAME`` appends (value on stdin); the file is created 0600
and is readable by its owner only. No secret value is ever logged, published or put in an
error message: errors name the tenant and the secret's name.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from shared.egress import HOST_RE
from shared.tokens import TENANT_RE

SECRET_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SECRET_NAME_RE: Final = re.compile(SECRET_NAME_PATTERN)
MAX_SECRET_BYTES: Final = 16 * 1024


class SecretEntry(msgspec.Struct, frozen=True):
    tenant: str
    name: str
    value: str
    set_at: str = ""
    host: str = ""
    """The only host the secret is sent to (``--host``); empty: any https host."""


def set_secret(path: Path, tenant: str, name: str, value: str, *, host: str = "") -> None:
    """Store ``value`` as the tenant's secret ``name`` (an empty value deletes it), for
    ``host`` only when given."""
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError("tenant must be 1-63 characters of a-z, 0-9, '-' or '_'")
    if not SECRET_NAME_RE.fullmatch(name):
        raise ValueError("a secret's name is 1-64 characters of A-Z, a-z, 0-9, '_', '.' or '-'")
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret holds at most {MAX_SECRET_BYTES} bytes")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("a secret cannot hold a line break or a NUL byte")
    if host and not HOST_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name")
    entry = SecretEntry(tenant, name, value, datetime.now(UTC).isoformat(), host.lower())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, msgspec.json.encode(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def get_secret(path: Path, tenant: str, name: str) -> SecretEntry | None:
    """The tenant's secret ``name``, or ``None`` (no file, no such secret, deleted)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    decoder = msgspec.json.Decoder(SecretEntry)
    found: SecretEntry | None = None
    for line in data.splitlines():
        try:
            entry = decoder.decode(line)
        except msgspec.DecodeError:
            continue  # a torn last line (a crash mid-append); never echoed
        if entry.tenant == tenant and entry.name == name:
            found = entry if entry.value else None
    return found
