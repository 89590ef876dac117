"""The CLI without a daemon: help, input errors, the daemon-down message, and
agentcg-exec's fallback that never loses the agent's command."""
from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from agentcg.cli.main import cli

BIN = os.path.dirname(sys.executable)


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_help_has_examples():
    res = invoke("--help")
    assert res.exit_code == 0
    assert "agentcg run --session agent-1" in res.output
    for sub in (["run", "--help"], ["session", "--help"], ["events", "--help"], ["status", "--help"]):
        r = invoke(*sub)
        assert r.exit_code == 0 and "Example" in r.output, sub


def test_daemon_down_says_how_to_start_it(tmp_path):
    sock = str(tmp_path / "none.sock")
    for args in (["status"], ["session", "list", "--json"], ["events"]):
        res = invoke("--socket", sock, *args)
        assert res.exit_code == 1
        assert f"agentcgd is not running at {sock}" in res.output
        assert "systemctl start agentcgd" in res.output


def test_socket_from_environment(tmp_path):
    sock = str(tmp_path / "env.sock")
    res = invoke("status", env={"AGENTCG_SOCKET": sock})
    assert f"not running at {sock}" in res.output


def test_run_with_daemon_down_exits_125(tmp_path):
    res = invoke("--socket", str(tmp_path / "x.sock"), "run", "--", "true")
    assert res.exit_code == 125
    assert "not running" in res.output


def test_bad_intent_is_rejected_before_connecting(tmp_path):
    res = invoke("--socket", str(tmp_path / "x.sock"), "run", "--intent", "memory=2X", "--", "true")
    assert res.exit_code == 2
    assert "--intent memory: '2X' is not a size" in res.output
    res = invoke("session", "create", "bad name")
    assert res.exit_code == 2 and "session: 'bad name'" in res.output


def test_run_needs_a_command():
    res = invoke("run")
    assert res.exit_code != 0


def test_exec_runs_plainly_and_warns_once_when_daemon_down(tmp_path):
    env = dict(os.environ, AGENTCG_SOCKET=str(tmp_path / "down.sock"), XDG_RUNTIME_DIR=str(tmp_path),
               AGENT_RESOURCE_HINT="memory=1G,name=probe")
    env.pop("AGENTCG_SESSION", None)
    exe = os.path.join(BIN, "agentcg-exec")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "agentcg.cli.hintexec"]
    first = subprocess.run(cmd + ["-c", "echo out; exit 7"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 7
    assert first.stdout == "out\n"
    assert "not reachable" in first.stderr
    second = subprocess.run(cmd + ["-c", "exit 0"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0
    assert second.stderr == ""


def test_status_outline_prints_records_one_per_line():
    """Lists of records (the policy's last actions) are one line each, by
    their own text where they carry one, not one run-on line of key=value."""
    from agentcg.cli.main import _tree_lines
    st = {"hooks": {"policy": {"ticks": 3, "last_actions": [
        {"kind": "set", "line": "memory.high 2G -> 1.2G on s-a/c-1 (throttle)"},
        {"kind": "freeze", "target": "s-b/c-2"}]}}, "sessions": ["a", "b"]}
    lines = _tree_lines(st)
    assert "      - memory.high 2G -> 1.2G on s-a/c-1 (throttle)" in lines
    assert "      - kind=freeze, target=s-b/c-2" in lines
    assert "sessions: a, b" in lines
