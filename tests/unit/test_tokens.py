"""The tokens file as the gateway reads it: new tokens work at once, removed ones stop."""

from __future__ import annotations

import os
from pathlib import Path

from shared.tokens import RECHECK_S, TokenStore, create_token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_token_works_at_once_and_a_removed_one_within_a_second(tmp_path: Path) -> None:
    path, clock = tmp_path / "tokens", Clock()
    kept = create_token(path, "acme")
    store = TokenStore(path, clock=clock)
    assert store.tenant_for(kept) == "acme"
    added = create_token(path, "globex")  # no time passes: an unknown token looks again
    assert store.tenant_for(added) == "globex"

    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0])  # globex's token revoked
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert store.tenant_for(added) == "globex"  # taken on the file's word for a moment
    clock.now += RECHECK_S
    assert store.tenant_for(added) is None
    assert store.tenant_for(kept) == "acme"
    assert store.tenant_for("sst_guess") is None


def test_a_missing_file_knows_no_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = create_token(path, "acme")
    store = TokenStore(path, clock=Clock())
    assert store.tenant_for(token) == "acme"
    path.unlink()
    assert store.tenant_for("sst_other") is None  # an unknown token looks, and finds no file
    assert store.tenant_for(token) is None
