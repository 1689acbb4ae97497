"""The committed schemas/ match what the code generates (run `make schemas` after a change)."""

from __future__ import annotations

from pathlib import Path

from services.schemas import generated, main
from shared import events as ev


def test_schemas_on_disk_match_the_code(repo_root: Path) -> None:
    assert main(["--dir", str(repo_root / "schemas"), "--check"]) == 0


def test_every_event_has_a_schema_and_a_stable_tag() -> None:
    docs = generated()
    for cls in ev.EVENT_TYPES:
        name = ev.type_name(cls)
        assert f"events/{name}.json" in docs
        assert cls.__name__ == name  # tags are explicit; this catches a rename of either


def test_drift_is_detected(tmp_path: Path) -> None:
    assert main(["--dir", str(tmp_path)]) == 0
    target = tmp_path / "events" / "TaskRequested.json"
    target.write_text(target.read_text().replace("prompt", "promptx"))
    assert main(["--dir", str(tmp_path), "--check"]) == 1


def test_events_round_trip() -> None:
    event = ev.TaskRequested(
        event_id="t_x:TaskRequested:1", task_id="t_x", tenant="a", spec=ev.TaskSpec(prompt="p")
    )
    assert ev.decode(ev.encode(event)) == event
    assert b'"type":"TaskRequested"' in ev.encode(event)
