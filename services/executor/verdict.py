"""How an agent run ended, from what is known once it is over: no I/O here.

The executor gathers the facts (the keeper's closing block, the CLI's result line, the model
proxy's counters, what the engine says about OOM kills and refused forks) and asks
:func:`judge` for the run's end: ``None`` (``ExecutionCompleted``) or an error code and a
message (``ExecutionFailed``). The first matching rule wins:

1. ``budget_exceeded``: the model proxy refused a model call (whatever the agent made of it,
   the task did not get the run it asked for);
2. ``output_limit``: the agent wrote more than the task may keep;
3. success: exit code 0 and the CLI said ``is_error: false`` (even past the deadline: it
   finished before it could be stopped);
4. ``internal``: the run was claimed but never started;
5. ``timeout``: the executor stopped it at the deadline;
6. ``oom``: killed for memory (exit 137 or no status, and an OOM kill was counted);
7. ``pids_limit``: the sandbox refused forks;
8. ``cli_error``: anything else, with the CLI's own words or its stderr.
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


def succeeded(collected: Collected, result: AgentResult) -> bool:
    return collected.exit_code == 0 and result.found and not result.is_error


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
    if succeeded(collected, result):
        return None
    if not collected.started:
        return "internal", "the agent run was claimed but never started"
    if facts.timed_out:
        return "timeout", (
            f"the agent ran past the task's timeout_s of {facts.timeout_s} seconds and was stopped"
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
