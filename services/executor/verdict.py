"""How an agent run ended, from what is known once it is over: no I/O here.

The executor gathers the facts (the keeper's closing block, the CLI's result line, the model
proxy's counters, what the engine says about OOM kills and refused forks) and asks
:func:`judge` for the run's end: ``None`` (``ExecutionCompleted``) or an error code and a
message (``ExecutionFailed``). The first matching rule wins:

1. ``budget_exceeded``: the model proxy refused a model call (whatever the agent made of it,
   the task did not get the run it asked for);
2. ``output_limit``: the agent wrote more than the task may keep;
3. ``permission_denied``: the task asked to fail on any permission denial, and there was one;
4. success: exit code 0 and the CLI said ``is_error: false`` (even past the deadline: it
   finished before it could be stopped), or the CLI printed such a result and was stopped
   because it did not exit after it (warning ``stopped_after_result``);
5. ``internal``: the run was claimed but never started;
6. ``timeout``: the executor stopped it at the deadline;
7. ``stalled``: no output from the agent and no bytes from the model for ``stall_timeout_s``;
8. ``oom``: killed for memory (exit 137 or no status, and an OOM kill was counted);
9. ``pids_limit``: the sandbox refused forks;
10. ``cli_error``: anything else, with the CLI's own words or its stderr.

:func:`warnings` says what did not go as asked even when the run succeeded.
"""

from __future__ import annotations

import msgspec

from services.executor.agent import AgentResult, Collected


class Facts(msgspec.Struct, frozen=True, kw_only=True):
    collected: Collected
    result: AgentResult
    budget_exceeded: str = ""
    """The model proxy's reason for refusing a model call; empty when it refused none."""
    output_limited: bool = False
    timed_out: bool = False
    oom_killed: bool = False
    """The engine or the cgroup counted an OOM kill."""
    pids_limit_hits: int = 0
    timeout_s: int = 600
    max_output_bytes: int = 0
    stalled: bool = False
    stall_timeout_s: int = 300
    stopped_after_result: bool = False
    """The CLI printed its result, did not exit, and was stopped (its result is kept)."""
    fail_on_permission_denial: bool = False


def succeeded(
    collected: Collected, result: AgentResult, *, stopped_after_result: bool = False
) -> bool:
    if not result.found or result.is_error:
        return False
    return collected.exit_code == 0 or stopped_after_result


def judge(facts: Facts) -> tuple[str, str] | None:
    """``None`` when the run succeeded, else ``(code, message)`` (see the module docs)."""
    collected, result = facts.collected, facts.result
    if facts.budget_exceeded:
        return "budget_exceeded", (
            f"the model proxy stopped the run's model calls: {facts.budget_exceeded}"
        )
    if facts.output_limited:
        return "output_limit", (
            f"the agent wrote more than {facts.max_output_bytes} bytes of output "
            "(SANDSTREAM_MAX_OUTPUT_BYTES) and was stopped; the output up to it is kept"
        )
    if facts.fail_on_permission_denial and result.permission_denials:
        tools = sorted({str(d.get("tool_name", "?")) for d in result.permission_denials})
        return "permission_denied", (
            f"the agent was refused {len(result.permission_denials)} tool call(s) "
            f"({', '.join(tools)[:500]}) and the task asked to fail on any"
        )
    if succeeded(collected, result, stopped_after_result=facts.stopped_after_result):
        return None
    if not collected.started:
        return "internal", "the agent run was claimed but never started"
    if facts.timed_out:
        return "timeout", (
            f"the agent ran past the task's timeout_s of {facts.timeout_s} seconds and was stopped"
        )
    if facts.stalled:
        return "stalled", (
            f"no output from the agent and no bytes from the model for {facts.stall_timeout_s} "
            "seconds (stall_timeout_s): the run was stopped"
        )
    if collected.exit_code in (137, None) and facts.oom_killed:
        return "oom", "the agent was killed for running out of memory"
    if facts.pids_limit_hits > 0:
        return "pids_limit", (
            "the sandbox ran out of processes (its pids limit refused "
            f"{facts.pids_limit_hits} forks) and the agent failed"
        )
    return "cli_error", cli_error_message(collected.exit_code, result, collected.stderr_tail)


def cli_error_message(exit_code: int | None, result: AgentResult, stderr: str) -> str:
    if result.found and result.is_error:
        detail = result.text or result.subtype or "no detail"
        return f"the agent reported an error ({result.subtype or 'error'}): {detail[:2000]}"
    where = f"exited with code {exit_code}" if exit_code is not None else "ended without a status"
    what = f"the agent {where}" + ("" if result.found else " without a result")
    return f"{what}; stderr: {stderr[-1000:]}" if stderr else what


def warnings(facts: Facts) -> list[str]:
    """What did not go as asked, success or not: ``permission_denied`` (a tool call was
    refused), ``empty_result`` (a success without a word), ``max_turns_reached``,
    ``stopped_after_result``."""
    result = facts.result
    out = []
    if result.permission_denials:
        out.append("permission_denied")
    if result.found and not result.is_error and not result.text.strip():
        out.append("empty_result")
    if result.subtype == "error_max_turns":
        out.append("max_turns_reached")
    if facts.stopped_after_result:
        out.append("stopped_after_result")
    return out
