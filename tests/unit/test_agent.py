"""The agent run's pure parts: command line, environment, script, parsing (no I/O)."""

from __future__ import annotations

import base64
import json

import pytest

from services.executor import agent
from shared.events import AgentConfig, NetworkSpec, TaskSpec


def test_command_has_the_fixed_flags_and_the_task_options() -> None:
    plain = agent.command(TaskSpec(prompt="hi"))
    assert plain == [
        "claude",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "acceptEdits",
    ]
    assert "hi" not in plain  # the prompt goes through stdin
    full = agent.command(
        TaskSpec(prompt="hi", max_turns=3, model="claude-x", allowed_tools=["Bash", "Read(*)"])
    )
    assert full[7:] == [
        "--max-turns",
        "3",
        "--model",
        "claude-x",
        "--allowedTools",
        "Bash",
        "Read(*)",
    ]


def test_environment_holds_a_placeholder_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # The executor's own environment holds the real credentials; none may leak through.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-real-key-in-the-executor")
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "oauth-real-token-in-the-executor")
    env = agent.environment(port=4100, max_retries=2)
    assert not any("real" in value for value in env.values()), env
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:4100"
    assert env["ANTHROPIC_API_KEY"] == agent.PLACEHOLDER_KEY
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "2"
    assert env["HOME"].startswith("/tmp/")
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in env


def test_a_task_with_network_skips_the_web_fetch_preflight_unless_its_settings_say_otherwise() -> (
    None
):
    config = f"{agent.CONFIG_DIR.removeprefix('/tmp/')}/{agent.SETTINGS_FILE}"
    plain = TaskSpec(prompt="hi")
    assert agent.run_settings(plain) is None and agent.config_files(plain) == {}
    assert "--settings" not in agent.command(plain)
    online = TaskSpec(prompt="hi", network=NetworkSpec(allow=["docs.test"]))
    assert json.loads(agent.config_files(online)[config]) == {"skipWebFetchPreflight": True}
    assert "--settings" in agent.command(online)
    theirs = TaskSpec(
        prompt="hi",
        network=NetworkSpec(allow=["docs.test"]),
        agent=AgentConfig(settings={"skipWebFetchPreflight": False, "model": "x"}),
    )
    assert agent.run_settings(theirs) == {"skipWebFetchPreflight": False, "model": "x"}


def test_the_installations_ca_reaches_only_tasks_with_network() -> None:
    ca = b"-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n"
    path = f"{agent.CONFIG_DIR.removeprefix('/tmp/')}/{agent.CA_FILE}"
    assert path not in agent.config_files(TaskSpec(prompt="hi"), ca=ca)
    online = TaskSpec(prompt="hi", network=NetworkSpec(allow=["docs.test"]))
    assert agent.config_files(online, ca=ca)[path] == ca
    env = agent.environment(egress_port=agent.EGRESS_PORT, extra_ca=True)
    assert env["NODE_EXTRA_CA_CERTS"] == f"{agent.CONFIG_DIR}/{agent.CA_FILE}"
    bundle = f"{agent.CONFIG_DIR}/{agent.CA_BUNDLE}"
    assert all(env[name] == bundle for name in agent.CA_BUNDLE_VARS)
    offline = agent.environment(extra_ca=True)  # no way out: nothing to trust
    assert not {"NODE_EXTRA_CA_CERTS", *agent.CA_BUNDLE_VARS} & set(offline)


def test_start_argv_passes_command_and_prompt_chunks() -> None:
    prompt = "é" * (agent.PROMPT_CHUNK * 2 + 5)
    spec = TaskSpec(prompt=prompt, allowed_tools=["Bash"])
    argv = agent.start_argv("SCRIPT", spec, port=4001)
    cmd = agent.command(spec)
    assert argv[:9] == ["bash", "-c", "SCRIPT", "sandstream", "start", "4001", "0",
                        str(len(cmd)), cmd[0]]  # fmt: skip
    chunks = argv[8 + len(cmd) :]
    assert "".join(chunks) == prompt and len(chunks) == 3
    assert all(len(c.encode()) < 128 * 1024 for c in chunks)
    assert agent.prompt_chunks("") == [""]


def test_the_egress_proxy_is_for_everything_but_the_model() -> None:
    spec = TaskSpec(prompt="p")
    assert agent.start_argv("S", spec, port=4001, egress_port=3128)[5:7] == ["4001", "3128"]
    env = agent.environment(port=4001, egress_port=3128)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:3128"
    assert "127.0.0.1" in env["NO_PROXY"].split(",")  # the model stays direct
    assert "HTTP_PROXY" not in agent.environment(port=4001)  # no network: no proxy at all


def test_the_nonce_is_never_in_argv() -> None:
    """argv is readable by every user in the sandbox (``/proc/*/cmdline``); the nonce goes
    to the keeper in its environment, which the agent's user cannot read."""
    argv = agent.follow_argv("SCRIPT", from_line=7)
    assert argv == ["bash", "-c", "SCRIPT", "sandstream", "follow", "7"]
    env = agent.keeper_environment("sandstream-end-abc")
    assert env[agent.NONCE_VAR] == "sandstream-end-abc"
    assert not any("sandstream-end" in a for a in agent.start_argv("S", TaskSpec(prompt="p")))


def test_wrapper_script_has_the_lock_forwarder_and_paths() -> None:
    script = agent.wrapper_script(run_dir="/tmp/r x", keeper_dir="/k y", max_diff_bytes=10)
    assert "R='/tmp/r x'" in script and "K='/k y'" in script
    assert 'mkdir "$R"' in script  # the atomic lock
    assert "TCP-LISTEN:$1,bind=127.0.0.1,fork,reuseaddr" in script  # the bridge to a socket
    assert '"UNIX-CONNECT:$2"' in script and 'bridge "$port" "$S"' in script
    assert agent.MODEL_SOCKET in agent.wrapper_script()
    assert '</dev/null >>"$home/socat.log" 2>&1 &' in script  # detached: exec does not wait
    assert "head -c 11" in script
    assert "__" not in script.replace("$((", "")  # every placeholder was filled in


def test_parse_collected_reads_status_files_and_diff() -> None:
    lines = [
        "exit=0",
        "pid=42",
        "oom=0",
        "stderr=",
        "files=2",
        "hello.txt",
        '"we\\tird\\303\\251.txt"',
        "diff --git a/hello.txt b/hello.txt",
        "+hi",
    ]
    got = agent.parse_collected(lines)
    assert got.exit_code == 0 and got.started and got.oom_kills == 0
    assert got.files_changed == ["hello.txt", "we\tirdé.txt"]
    assert got.diff == "diff --git a/hello.txt b/hello.txt\n+hi\n"
    assert not got.diff_truncated

    lost = agent.parse_collected(["exit=", "pid=", "oom=", "stderr=boom", "files=0"])
    assert lost.exit_code is None and not lost.started and lost.stderr_tail == "boom"
    assert lost.diff == "" and lost.files_changed == []

    big = agent.parse_collected(
        ["exit=1", "pid=1", "oom=3", "files=0", "x" * 100], max_diff_bytes=10
    )
    assert big.diff_truncated and big.diff.startswith("x" * 10) and "truncated" in big.diff
    assert big.oom_kills == 3
    assert agent.parse_collected([]).exit_code is None


def test_paths_the_agent_hid_from_the_keeper_are_named_not_left_out() -> None:
    lines = ["exit=0", "pid=4", "unreadable=2", "files=1", "a.txt", "secret", "dir/sub",
             "diff --git a/a.txt b/a.txt", "+a"]  # fmt: skip
    got = agent.parse_collected(lines)
    assert got.unreadable == ["secret", "dir/sub"]
    assert got.files_changed == ["a.txt", "secret", "dir/sub"]
    assert got.diff.startswith("diff --git a/a.txt b/a.txt\n+a\n")
    assert "2 workspace paths could not be recorded" in got.diff and "secret, dir/sub" in got.diff

    failed = agent.parse_collected(["exit=0", "pid=4", "collect_error=No space", "files=0"])
    assert failed.collect_error == "No space" and "could not be recorded: No space" in failed.diff


def _line(obj: dict[str, object]) -> str:
    return json.dumps(obj)


TRANSCRIPT = [
    _line({"type": "system", "subtype": "init", "session_id": "s-1", "cwd": "/workspace"}),
    _line(
        {
            "type": "assistant",
            "session_id": "s-1",
            "message": {"content": [{"type": "text", "text": "working"}]},
        }
    ),
    "not json at all",
    "",
    _line(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "result": "all done",
            "num_turns": 2,
            "total_cost_usd": 0.0123,
            "usage": {"input_tokens": 200, "output_tokens": 40},
            "session_id": "s-1",
            "permission_denials": [{"tool_name": "Bash", "tool_input": {"command": "env"}}],
            "duration_ms": 812,
        }
    ),
]


def test_transcript_parses_the_final_result() -> None:
    result = agent.parse_result(TRANSCRIPT)
    assert result.found and not result.is_error
    assert result.text == "all done" and result.subtype == "success"
    assert (result.num_turns, result.total_cost_usd, result.duration_ms) == (2, 0.0123, 812)
    assert result.usage == {"input_tokens": 200, "output_tokens": 40}
    assert result.session_id == "s-1"
    assert result.permission_denials == [{"tool_name": "Bash", "tool_input": {"command": "env"}}]


def test_transcript_without_result_is_an_error_with_what_is_known() -> None:
    t = agent.Transcript().feed_all(TRANSCRIPT[:3])
    result = t.result()
    assert not result.found and result.is_error
    assert result.text == "working" and result.session_id == "s-1"
    assert t.lines == 3
    error = agent.parse_result(
        [_line({"type": "result", "subtype": "error_max_turns", "is_error": True})]
    )
    assert error.found and error.is_error and error.subtype == "error_max_turns"


def test_truncate_and_bounded_denials() -> None:
    assert agent.truncate_line("short", 10) == "short"
    cut = agent.truncate_line("é" * 100, 11)
    assert cut.startswith("é" * 5) and "line truncated, 200 bytes" in cut
    big = {"tool_name": "Write", "tool_input": {"content": "x" * 10_000}}
    small = {"tool_name": "Bash", "tool_input": {"command": "env"}}
    out = agent.bounded_denials([big, small] * 50, 8 * 1024)
    assert out[0]["tool_input"]["content"].startswith("x" * 1024)
    assert len(json.dumps(out)) < 9 * 1024 and out[1] == small


def test_unquote_git_path() -> None:
    assert agent.unquote_git_path("plain name.txt") == "plain name.txt"
    assert agent.unquote_git_path('"a\\nb\\"c\\\\"') == 'a\nb"c\\'


def test_files_changed_is_bounded() -> None:
    many = [f"dir/file-{i:05d}.txt" for i in range(5000)]
    lines = ["exit=0", "pid=7", "oom=0", "stderr=", f"files={len(many)}", *many]
    got = agent.parse_collected(lines).files_changed
    assert got[:1000] == many[:1000] and len(got) == 1001
    assert got[-1] == "[sandstream: 4000 more files not listed]"
    long = ["x" * 4000 + str(i) for i in range(40)]
    got = agent.bounded_names(long)
    assert sum(len(n) for n in got[:-1]) <= agent.MAX_FILES_BYTES
    assert got[-1].endswith(f"{40 - len(got) + 1} more files not listed]")
    assert agent.bounded_names(["a", "b"]) == ["a", "b"]


# ---- the pack command's stream ---------------------------------------------------------------


def test_the_pack_stream_splits_into_the_session_and_the_workspace() -> None:
    packs = agent.split_packs(b"0 5\nSESS\nWORKSPACE\nBYTES")
    assert packs == agent.Packs(session=b"SESS\n", session_status=0, workspace=b"WORKSPACE\nBYTES")
    none = agent.split_packs(b"5 0\nWS")  # the CLI wrote no session
    assert none.session is None and none.session_status == 5 and none.workspace == b"WS"
    failed = agent.split_packs(b"2 0\nWS")  # its tar failed: nothing of it, said
    assert failed.session is None and failed.session_status == 2


@pytest.mark.parametrize(
    "raw",
    [b"", b"no header at all", b"0 5\nabc", b"0 -1\nx", b"0 5 6\nx", b"x 1\nx", b"0 1"],
)
def test_a_cut_or_foreign_pack_stream_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        agent.split_packs(raw)


def test_the_runs_packs_decode_only_whole() -> None:
    data = b"0 0\n" + bytes(range(256)) * 300
    encoded = base64.b64encode(data).decode()
    lines = [encoded[i : i + 65536] for i in range(0, len(encoded), 65536)]
    assert agent.decode_packs(lines, len(data)) == data
    assert agent.decode_packs(lines[:-1], len(data)) is None  # cut at a line: said short
    assert agent.decode_packs(["not base64!"], 8) is None
