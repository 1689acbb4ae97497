"""The executor's side of a warm sandbox's launcher (``shared.launch``), on real FIFOs. The
launcher itself runs in a sandbox: tests/integration/test_executor.py and test_lifecycle.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import launch


def test_a_request_reaches_a_waiting_launcher_with_the_environment_and_argv(
    tmp_path: Path,
) -> None:
    launch.prepare(tmp_path)
    launch.prepare(tmp_path)  # made again (a retried pool fill): fine
    reader = os.open(tmp_path / launch.FIFO, os.O_RDONLY | os.O_NONBLOCK)  # the launcher
    try:
        env = {"HOME": "/tmp/h", "EMPTY": ""}
        argv = ["bash", "-c", "echo 'a b'\n", "sandstream", "start", ""]
        assert launch.request(tmp_path, env, argv)
        assert os.read(reader, 16) == b"\n"  # the doorbell rang once
    finally:
        os.close(reader)
    fields = (tmp_path / launch.REQUEST).read_bytes().split(b"\x00")
    assert fields[-1] == b""  # every entry NUL-terminated, as mapfile -d '' reads them
    assert [f.decode() for f in fields[:-1]] == ["2", "HOME=/tmp/h", "EMPTY=", *argv]
    if os.geteuid() in (0, 1000):  # able to give it to uid 1000: nobody else reads it
        assert (tmp_path / launch.REQUEST).stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / (launch.REQUEST + ".tmp")).exists()


def test_without_a_launcher_waiting_the_caller_starts_the_run(tmp_path: Path) -> None:
    assert not launch.request(tmp_path, {}, ["true"])  # a sandbox made without one
    launch.prepare(tmp_path)
    assert not launch.request(tmp_path, {}, ["true"])  # its launcher is gone (it ran once)


def test_a_nul_in_a_request_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    launch.prepare(tmp_path)
    with pytest.raises(ValueError, match="NUL"):
        launch.request(tmp_path, {"A": "x\x00y"}, ["true"])
    assert not (tmp_path / launch.REQUEST).exists()
