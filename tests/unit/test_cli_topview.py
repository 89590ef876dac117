"""agentcg top's frame (cli/topview.py) from daemon-shaped replies, and its
option checks, without a daemon. Against a real daemon and in a terminal:
tests/kernel/test_cli_top.py."""
from __future__ import annotations

from click.testing import CliRunner

from agentcg.cli.main import cli
from agentcg.cli.topview import Frame, frame_lines, merge_actions

NOW_NS = 1_000_000_000_000


def _action(session: str, rule: str, t_ns: int, line: str, measured: str = "", threshold: str = "") -> dict:
    return {"kind": "set", "knob": "memory.high", "target": f"s-{session}/c-1", "session": session, "t_ns": t_ns,
            "line": line, "reason": {"rule": rule, "measured": measured, "threshold": threshold}}


def _status(level: int, actions: list[dict]) -> dict:
    return {"daemon": {"pid": 42, "uptime_s": 61.0, "cgroup_root": "/sys/fs/cgroup/agentcg", "controllers": ["memory"]},
            "sessions": 1, "running_calls": 1,
            "hooks": {"policy": {"ladder_level": level, "frozen": [], "ticks": 9, "last_actions": actions}}}


def test_pressure_is_the_stall_the_policy_last_acted_on_and_the_ladder_is_named():
    acted = _action("a", "psi_pressure", NOW_NS - 2_000_000_000, "memory.high 2G -> 1.2G on s-a/c-1 (throttle)",
                    measured="40ms/500ms", threshold="10ms")
    other = _action("b", "psi_pressure", NOW_NS - 1_000_000_000, "memory.high on s-b", measured="99ms/500ms")
    session = {"name": "a", "uid": 0, "limits": {"memory_high_bytes": 2 << 30, "memory_max_bytes": 4 << 30},
               "running_calls": 1, "calls_done": 3,
               "calls": [{"call": 4, "name": "pytest", "pid": 77, "running_s": 1.5,
                          "limits": {"memory_high_bytes": 1 << 30, "memory_max_bytes": None},
                          "stats": {"memory_current_bytes": 512 << 20, "cpu_usage_usec": 250_000}}]}
    frame = Frame(_status(1, [acted]), [session], actions=merge_actions([], [acted, other, acted]))
    lines = [line.text for line in frame_lines(frame, now_mono_ns=NOW_NS)]
    assert lines[1].startswith("policy: ladder level 1 (throttle)  frozen -  ticks 9")
    head = next(t for t in lines if t.startswith("session a "))
    budget = lines[lines.index(head) + 1]
    assert "memory.high 2G  memory.max 4G" in budget
    assert "pressure 40ms/500ms > 10ms (2.0s ago)" in budget
    row = lines[lines.index(head) + 3].split()
    assert row == ["c-4", "pytest", "77", "1.5s", "512M", "1G", "-", "250.0ms"]
    shown = [t.strip() for t in lines[lines.index("last policy actions") + 1:]]   # newest first, each once
    assert shown == ["1.0s ago  memory.high on s-b", "2.0s ago  memory.high 2G -> 1.2G on s-a/c-1 (throttle)"]


def test_no_daemon_reply_shows_the_error_only():
    lines = frame_lines(Frame(None, error="agentcgd is not running at /x.sock"))
    assert [line.text for line in lines][1:] == ["agentcgd: agentcgd is not running at /x.sock"]


def test_json_needs_once_and_the_live_view_a_terminal(tmp_path):
    runner = CliRunner()
    sock = str(tmp_path / "none.sock")
    for args in (["top", "--json"], ["--json", "top"]):
        res = runner.invoke(cli, ["--socket", sock, *args])
        assert res.exit_code == 2 and "--json needs --once" in res.output
    res = runner.invoke(cli, ["--socket", sock, "top"])   # CliRunner's stdout is no terminal
    assert res.exit_code == 2 and "use --once" in res.output
    res = runner.invoke(cli, ["--socket", sock, "--json", "top", "--once"])
    assert res.exit_code == 1 and f"agentcgd is not running at {sock}" in res.output
    assert "Example" in runner.invoke(cli, ["top", "--help"]).output
