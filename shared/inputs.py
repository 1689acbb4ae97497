"""A task's inline ``files``: their rules, and the one tar they travel in.

The gateway checks every path and packs the files into a tar (deterministic: the same files
give the same bytes), stores it under ``inputs/<sha256>.tar`` and puts a reference in the
task's spec; the executor reads it back, checks its sha256 and unpacks it into the workspace
after the checkout (so a file overrides the repository's).

Paths are relative, normalized, inside the workspace: no absolute path, no ``.``/``..`` or
empty part, no ``.git`` part, no control character. Links of a checked-out repository are the
executor's to check (only it sees the checkout).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Sequence
from typing import Final

from shared.sandbox import SANDBOX_UID

MAX_FILES: Final = 1000
MAX_FILES_BYTES: Final = 10 * 1024 * 1024
"""Decoded content of a task's files, all together."""
MAX_PATH: Final = 1024
MODES: Final = {"0644": 0o644, "0755": 0o755}
INPUTS_PREFIX: Final = "inputs/"


_CHAR = r"[^/\x00-\x1f\x7f]"
_NO_DOT = r"[^/.\x00-\x1f\x7f]"
_NOT_GIT = (  # a part starting with "." that is not ".", "..", or ".git" in any case
    rf"\.[^/.gG\x00-\x1f\x7f]{_CHAR}*|\.[gG]|\.[gG][^/iI\x00-\x1f\x7f]{_CHAR}*|\.[gG][iI]"
    rf"|\.[gG][iI][^/tT\x00-\x1f\x7f]{_CHAR}*|\.[gG][iI][tT]{_CHAR}+|\.\.{_CHAR}+"
)
_PART = rf"(?:{_NO_DOT}{_CHAR}*|{_NOT_GIT})"
PATH_PATTERN: Final = rf"^{_PART}(?:/{_PART})*$"
"""A task file's path, as the OpenAPI document gives it; :func:`path_problem` says why not."""
_PATH_RE: Final = re.compile(PATH_PATTERN)


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a task file's path (:data:`PATH_PATTERN`), or ``None``."""
    if len(path) > MAX_PATH:
        return f"a path has at most {MAX_PATH} characters"
    if _PATH_RE.fullmatch(path):
        return None
    if not path:
        return "a path is not empty"
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return "a path holds no control character"
    if path.startswith("/"):
        return "a path is relative to the workspace, not absolute"
    parts = path.split("/")
    if any(part.lower() == ".git" for part in parts):
        return "a path cannot reach into .git"
    return "a path has no empty, '.' or '..' part (it stays inside the workspace)"


def pack(files: Sequence[tuple[str, bytes, int]]) -> bytes:
    """One tar of ``(path, content, mode)``, the agent's, with a fixed time: deterministic."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content, mode in files:
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mode = mode
            info.uid = info.gid = SANDBOX_UID
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def unpack(archive: bytes) -> list[tuple[str, bytes, int]]:
    """The ``(path, content, mode)`` of a tar made by :func:`pack`, in order."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        for member in tar.getmembers():
            if not member.isfile() or path_problem(member.name):
                raise ValueError(f"not a task file: {member.name!r}")
            handle = tar.extractfile(member)
            assert handle is not None
            out.append((member.name, handle.read(), member.mode))
    return out


def names(archive: bytes) -> list[str]:
    """The paths in a tar made by :func:`pack`; ``ValueError`` for anything else in it."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        members = tar.getmembers()
    for member in members:
        if not member.isfile() or path_problem(member.name):
            raise ValueError(f"not a task file: {member.name!r}")
    return [m.name for m in members]


def input_key(sha256: str) -> str:
    return f"{INPUTS_PREFIX}{sha256}.tar"
