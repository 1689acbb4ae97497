"""A property-based fuzzer (schemathesis) against ``/openapi.json`` of a real ``sandstream up``.

Every check is on, the stateful phase included: it follows the document's links (submit, then
read, cancel, stream the task), so a status code, header or body the document does not declare,
a schema-valid request the server refuses, or a schema-invalid one it accepts fails this test.
The seed is fixed so a failure reproduces; ``SANDSTREAM_FUZZ_SEED`` and
``SANDSTREAM_FUZZ_EXAMPLES`` explore further.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.test_up import System, docker_available, start_up, stop_up
from tests.fakes.model import FakeModel, Text

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    if not docker_available():
        pytest.skip("needs a running Docker engine and the sandbox image (make image)")
    async with FakeModel() as fake:
        fake.script([Text("done")])
        up = await start_up(tmp_path, fake)
        yield up
        stop_up(up)


async def test_the_api_matches_its_openapi_document(system: System, tmp_path: Path) -> None:
    seed = os.environ.get("SANDSTREAM_FUZZ_SEED", "20261203")
    examples = os.environ.get("SANDSTREAM_FUZZ_EXAMPLES", "30")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{system.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {system.token}",
        "--checks",
        "all",
        # in its place: positive_data_acceptance_but_follow_up (fuzz_hooks.py says why)
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        examples,
        "--seed",
        seed,
        "--workers",
        "2",
        # No answer may take longer: the longest waits (?wait=60, an SSE stream, /execute of
        # a task that runs the fake model) end well before.
        "--request-timeout",
        "90",
        "--max-response-time",
        "90",
        # DELETE /v1/tasks/{id} is the deprecated alias of POST .../cancel: it keeps the task
        # (the log is append-only), which a fuzzer reads as "deleted resource still there".
        # tests/integration/test_gateway.py covers the alias.
        "--exclude-deprecated",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    # Asynchronously: the fake model answers the sandboxes from this test's event loop.
    hooks = {"SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("fuzz_hooks.py"))}
    run = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        env={**os.environ, **hooks},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await asyncio.wait_for(run.communicate(), 600)
    output = stdout.decode()
    cases = re.findall(r"(\d+) generated", output)
    print(output)
    print(f"schemathesis: seed {seed}, {examples} examples per operation, {cases[-1:]} cases")
    assert run.returncode == 0, f"schemathesis found mismatches (seed {seed}):\n{output}"
