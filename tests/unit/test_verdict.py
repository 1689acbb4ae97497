"""The executor's one decision about a run's end, rule by rule (services/executor/verdict.py)."""

from __future__ import annotations

from typing import Any

import pytest

from services.executor.agent import AgentResult, Collected
from services.executor.verdict import Facts, judge, warnings

OK = AgentResult(found=True, is_error=False, text="done")


def facts(exit_code: int | None = 0, result: AgentResult = OK, **kw: Any) -> Facts:
    collected = Collected(exit_code=exit_code, started=kw.pop("started", True))
    return Facts(collected=collected, result=result, timeout_s=60, max_output_bytes=100, **kw)


def test_success_needs_exit_0_and_the_clis_word() -> None:
    assert judge(facts()) is None
    assert judge(facts(timed_out=True)) is None  # finished before it could be stopped
    code, message = judge(facts(result=AgentResult(found=True, is_error=True, text="bad"))) or (
        "",
        "",
    )
    assert code == "cli_error" and "reported an error" in message and "bad" in message
    code, message = judge(facts(result=AgentResult(found=False))) or ("", "")
    assert code == "cli_error" and "without a result" in message


@pytest.mark.parametrize(
    ("kw", "code", "words"),
    [
        ({"budget_exceeded": "max_tokens 10 reached"}, "budget_exceeded", "max_tokens 10"),
        ({"output_limited": True}, "output_limit", "more than 100 bytes"),
        ({"exit_code": None, "started": False}, "internal", "never started"),
        ({"exit_code": 143, "timed_out": True}, "timeout", "timeout_s of 60"),
        ({"exit_code": 137, "oom_killed": True}, "oom", "out of memory"),
        ({"exit_code": 1, "oom_killed": True}, "cli_error", "exited with code 1"),
        ({"exit_code": 1, "pids_limit_hits": 3}, "pids_limit", "refused 3 forks"),
        ({"exit_code": None}, "cli_error", "ended without a status"),
    ],
)
def test_each_failure_has_its_code(kw: dict[str, Any], code: str, words: str) -> None:
    judged = judge(facts(**kw))
    assert judged is not None and judged[0] == code and words in judged[1]


def test_the_first_rule_wins() -> None:
    # A run refused by the budget or stopped for its output is not a success even at exit 0.
    assert (judge(facts(budget_exceeded="x", output_limited=True)) or ("",))[0] == "budget_exceeded"
    assert (judge(facts(output_limited=True)) or ("",))[0] == "output_limit"
    assert (judge(facts(exit_code=137, timed_out=True, oom_killed=True)) or ("",))[0] == "timeout"
    both = facts(exit_code=137, oom_killed=True, pids_limit_hits=2)
    assert (judge(both) or ("",))[0] == "oom"


def test_warnings_say_what_did_not_go_as_asked() -> None:
    denied = AgentResult(
        found=True, is_error=False, text="done", permission_denials=[{"tool_name": "Bash"}]
    )
    assert warnings(facts(result=denied)) == ["permission_denied"]
    assert warnings(facts(result=AgentResult(found=True, is_error=False, text=" "))) == [
        "empty_result"
    ]
    turns = AgentResult(found=True, is_error=True, subtype="error_max_turns", text="stopped")
    assert warnings(facts(exit_code=1, result=turns)) == ["max_turns_reached"]
    assert warnings(facts(exit_code=None, stopped_after_result=True)) == ["stopped_after_result"]
    assert warnings(facts()) == []


def test_a_result_then_a_hang_is_a_success_and_a_denial_can_be_a_failure() -> None:
    assert judge(facts(exit_code=None, stopped_after_result=True)) is None
    bad = AgentResult(found=True, is_error=True, text="no")
    assert (judge(facts(exit_code=None, result=bad, stopped_after_result=True)) or ("",))[0] == (
        "cli_error"
    )
    denied = AgentResult(
        found=True, is_error=False, text="ok", permission_denials=[{"tool_name": "Write"}]
    )
    assert judge(facts(result=denied)) is None
    strict = judge(facts(result=denied, fail_on_permission_denial=True))
    assert strict is not None and strict[0] == "permission_denied" and "Write" in strict[1]
    stalled = judge(facts(exit_code=143, stalled=True))
    assert stalled is not None and stalled[0] == "stalled" and "300 seconds" in stalled[1]
