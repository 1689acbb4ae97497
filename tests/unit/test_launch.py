"""The start command a warm sandbox's launcher takes (``shared.launch``). The launcher and the
keeper's side run in a sandbox: tests/integration/test_executor.py and test_lifecycle.py."""

from __future__ import annotations

import pytest

from shared import launch


def test_the_request_is_the_environment_then_argv_as_the_launcher_reads_it() -> None:
    env = {"HOME": "/tmp/h", "EMPTY": ""}
    argv = ["bash", "-c", "echo 'a b'\n", "sandstream", "start", ""]
    assert launch.request(env, argv) == ["2", "HOME=/tmp/h", "EMPTY=", *argv]
    assert launch.request({}, ["true"]) == ["0", "true"]


def test_a_nul_in_a_request_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        launch.request({"A": "x\x00y"}, ["true"])
    with pytest.raises(ValueError, match="NUL"):
        launch.request({}, ["a\x00b"])
