"""agentcg and agentcg-exec as real processes against a real agentcgd on this
host's cgroup2 tree (no controllers needed: placement, stats, events)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_cgroup2
from daemon_proc import start_daemon

pytestmark = pytest.mark.kernel
BIN = Path(sys.executable).parent


def _cmd(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


AGENTCG = _cmd("agentcg", "agentcg.cli.main")
AGENTCG_EXEC = _cmd("agentcg-exec", "agentcg.cli.hintexec")


@pytest.fixture
def daemon_env(request):
    for d in start_daemon(request, require_cgroup2(), stop_signal=signal.SIGTERM):
        yield d.client_env(XDG_RUNTIME_DIR=str(d.runtime)), d.root


def run(env, *args, cmd=AGENTCG):
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=120)


def test_run_passes_exit_status_through(daemon_env):
    env, root = daemon_env
    res = run(env, "run", "--", "sh", "-c", "exit 3")
    assert res.returncode == 3, res.stderr
    # the ad-hoc session is gone afterwards
    assert not [p for p in root.iterdir() if p.name.startswith("s-run-")]


def test_run_places_the_command_in_a_call_cgroup(daemon_env):
    env, root = daemon_env
    assert run(env, "session", "create", "t1").returncode == 0
    res = run(env, "run", "--session", "t1", "--name", "probe", "--", "cat", "/proc/self/cgroup")
    assert res.returncode == 0, res.stderr
    assert f"0::/{root.name}/s-t1/c-1\n" in res.stdout


def test_run_json_result_on_stderr(daemon_env):
    env, _ = daemon_env
    res = run(env, "run", "--json", "--intent", "memory=64M", "--", "sh", "-c", "echo out; exit 5")
    assert res.returncode == 5
    assert res.stdout == "out\n"
    result = json.loads(res.stderr.strip().splitlines()[-1])
    assert result["exit_status"] == 5
    assert result["stats"]["wall_ns"] > 0
    assert result["limits"]["memory_high_bytes"] == 64 << 20


def test_run_killed_by_signal_is_128_plus_n(daemon_env):
    env, _ = daemon_env
    res = run(env, "run", "--", "sh", "-c", "kill -9 $$")
    assert res.returncode == 137


def test_session_round_trip_text_and_json(daemon_env):
    env, _ = daemon_env
    res = run(env, "session", "create", "rt", "--intent", "memory=1G,priority=4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["name"] == "rt"
    assert run(env, "run", "--session", "rt", "--", "true").returncode == 0
    listing = json.loads(run(env, "session", "list", "--json").stdout)
    assert [s["name"] for s in listing] == ["rt"]
    assert listing[0]["calls_done"] == 1
    text = run(env, "session", "list").stdout
    assert text.splitlines()[0].split()[:3] == ["NAME", "UID", "CALLS"]
    assert "memory=1G,priority=4" in text
    show = json.loads(run(env, "session", "show", "rt", "--json").stdout)
    assert show["recent"][0]["exit_status"] == 0
    assert "CALL" in run(env, "session", "show", "rt").stdout
    assert run(env, "session", "end", "rt").returncode == 0
    gone = run(env, "session", "show", "rt")
    assert gone.returncode == 1 and "not_found" in gone.stderr
    assert json.loads(run(env, "session", "list", "--json").stdout) == []


def test_status_and_events_json(daemon_env):
    env, root = daemon_env
    st = json.loads(run(env, "status", "--json").stdout)
    assert st["daemon"]["cgroup_root"] == str(root)
    text = run(env, "status").stdout
    assert text.startswith("daemon:\n") and f"  cgroup_root: {root}\n" in text
    run(env, "run", "--name", "evt", "--", "true")
    evs = [json.loads(line) for line in run(env, "events", "--json").stdout.splitlines()]
    assert any(e.get("type") == "call.end" and e.get("name") == "evt" for e in evs)
    assert "call.end" in run(env, "events").stdout


def test_exec_wrapper_runs_a_tool_call_with_the_hint(daemon_env):
    env, root = daemon_env
    assert run(env, "session", "create", "agent").returncode == 0
    env = dict(env, AGENTCG_SESSION="agent", AGENT_RESOURCE_HINT="memory=32M,name=tests")
    res = run(env, "-c", "grep ^0:: /proc/self/cgroup; exit 6", cmd=AGENTCG_EXEC)
    assert res.returncode == 6, res.stderr
    assert res.stdout == f"0::/{root.name}/s-agent/c-1\n"
    show = json.loads(run(env, "session", "show", "agent", "--json").stdout)
    call = show["recent"][0]
    assert call["name"] == "tests" and call["limits"]["memory_high_bytes"] == 32 << 20
    bad = run(dict(env, AGENT_RESOURCE_HINT="cpu=warp"), "-c", "exit 0", cmd=AGENTCG_EXEC)
    assert bad.returncode == 2 and "AGENT_RESOURCE_HINT cpu: 'warp'" in bad.stderr


def test_unknown_session_is_an_error_not_a_silent_plain_run(daemon_env):
    env, _ = daemon_env
    res = run(dict(env, AGENTCG_SESSION="nosuch"), "-c", "echo ran", cmd=AGENTCG_EXEC)
    assert res.returncode == 125
    assert res.stdout == ""
    assert "nosuch" in res.stderr


def test_run_missing_program_is_127(daemon_env):
    env, root = daemon_env
    res = run(env, "run", "--", "no-such-program-agentcg")
    assert res.returncode == 127
    assert "command not found" in res.stderr
    assert not [p for p in root.iterdir() if p.name.startswith("s-run-")]


def test_events_follow_streams_new_calls(daemon_env):
    env, _ = daemon_env
    follower = subprocess.Popen(AGENTCG + ["events", "--follow", "--new", "--json"], env=env,
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let it subscribe
        assert run(env, "run", "--name", "followed", "--", "true").returncode == 0
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            ev = json.loads(follower.stdout.readline())
            seen.append(ev.get("type"))
            if ev.get("type") == "call.end":
                assert ev["name"] == "followed"
                break
        assert "call.end" in seen, seen
        assert "session.create" in seen
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(10)


def _cgroup_of(pid: int) -> str:
    return next(line[3:].strip() for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if line.startswith("0::"))


def test_session_create_attach_and_session_attach_move_the_agent(daemon_env):
    env, root = daemon_env
    agents = [subprocess.Popen(["sleep", "120"]) for _ in range(2)]
    try:
        res = run(env, "session", "create", "auto", "--attach", str(agents[0].pid), "--json")
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["attached"] == [{"pid": agents[0].pid, "cgroup": f"{root}/s-auto/agent"}]
        assert _cgroup_of(agents[0].pid) == f"/{root.name}/s-auto/agent"
        res = run(env, "session", "attach", "auto", str(agents[1].pid))
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"pid {agents[1].pid} attached to session auto ({root}/s-auto/agent)\n"
        assert _cgroup_of(agents[1].pid) == f"/{root.name}/s-auto/agent"
        show = json.loads(run(env, "session", "show", "auto", "--json").stdout)
        assert sorted(show["agent_pids"]) == sorted(a.pid for a in agents)
        assert run(env, "session", "end", "auto").returncode == 0
        assert not _cgroup_of(agents[0].pid).startswith(f"/{root.name}/")
    finally:
        for a in agents:
            a.kill()
            a.wait()


def test_session_create_attach_of_a_bad_pid_fails_and_leaves_no_session(daemon_env):
    env, root = daemon_env
    st = json.loads(run(env, "status", "--json").stdout)
    res = run(env, "session", "create", "nope", "--attach", str(st["daemon"]["pid"]))
    assert res.returncode == 1 and "is the daemon itself [bad_pid]" in res.stderr
    assert json.loads(run(env, "session", "list", "--json").stdout) == []
    assert not (root / "s-nope").exists()
    bad = run(env, "session", "attach", "nosuch", "1")
    assert bad.returncode == 1 and "not_found" in bad.stderr
    usage = run(env, "session", "create", "x", "--attach", "0")
    assert usage.returncode == 2 and "--attach: 0 is not a process id" in usage.stderr
    assert "Automatic mode" in run(env, "session", "create", "--help").stdout


def test_json_before_the_command_for_every_command(daemon_env):
    """`agentcg --json CMD` prints what `agentcg CMD --json` does, for each
    command that has --json (kubectl-style global flag)."""
    env, root = daemon_env
    created = run(env, "--json", "session", "create", "gj", "--intent", "memory=1G")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "gj"
    agent = subprocess.Popen(["sleep", "120"])
    try:
        attached = run(env, "--json", "session", "attach", "gj", str(agent.pid))
        assert json.loads(attached.stdout) == [{"pid": agent.pid, "cgroup": f"{root}/s-gj/agent"}]
        res = run(env, "--json", "run", "--session", "gj", "--name", "gj-call", "--", "sh", "-c", "echo out; exit 4")
        assert res.returncode == 4 and res.stdout == "out\n"
        assert json.loads(res.stderr.strip().splitlines()[-1])["exit_status"] == 4
        st = json.loads(run(env, "--json", "status").stdout)
        assert st["daemon"]["cgroup_root"] == str(root)
        assert [s["name"] for s in json.loads(run(env, "--json", "session", "list").stdout)] == ["gj"]
        show = run(env, "--json", "session", "show", "gj").stdout
        assert json.loads(show)["recent"][0]["exit_status"] == 4
        assert json.loads(run(env, "--json", "session", "show", "gj", "--json").stdout) == json.loads(show)
        evs = [json.loads(line) for line in run(env, "--json", "events", "--session", "gj").stdout.splitlines()]
        assert any(e.get("type") == "call.end" and e.get("name") == "gj-call" for e in evs)
        frame = json.loads(run(env, "--json", "top", "--once").stdout)
        assert [s["name"] for s in frame["sessions"]] == ["gj"]
        assert frame["status"]["daemon"]["cgroup_root"] == str(root)
        ended = run(env, "--json", "session", "end", "gj")
        assert ended.returncode == 0, ended.stderr
        assert json.loads(ended.stdout)["session"] == "gj"
    finally:
        agent.kill()
        agent.wait()
    # without it, text as before
    assert run(env, "status").stdout.startswith("daemon:\n")
