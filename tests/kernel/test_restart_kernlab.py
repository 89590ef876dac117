"""A daemon kill -9 in the middle of a tool call, then a restart, on real
cgroup v2 with controllers: `agentcg run`, `agentcg-exec` and the Python
client each return the tool's own exit status, and the restarted daemon
accounts the call (stats, one call.end event with that status)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2_controllers
from test_daemon_host import Agentcgd
from agentcg.client import Client

pytestmark = [pytest.mark.kernel, pytest.mark.kernlab]
BIN = Path(sys.executable).parent
TOOL = "sleep 3; exit 7"


def _cmd(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


@pytest.fixture
def daemon(request):
    root, runtime = daemon_dirs(request, require_cgroup2_controllers("memory", "pids"))
    d = Agentcgd(root, runtime).start()
    yield d
    d.stop(signal.SIGKILL)
    remove_daemon_tree(root)
    shutil.rmtree(runtime, ignore_errors=True)


def _env(d: Agentcgd) -> dict[str, str]:
    env = dict(os.environ, AGENTCG_SOCKET=d.socket, XDG_RUNTIME_DIR=str(d.runtime))
    for k in ("AGENTCG_SESSION", "AGENT_RESOURCE_HINT", "AGENTCG_RECONNECT_TIMEOUT_S"):
        env.pop(k, None)
    return env


def _wait_for_call(root: Path, proc: subprocess.Popen, timeout_s: float = 120) -> Path:
    """The call cgroup of the one tool call the process started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        calls = [c for s in root.glob("s-*") for c in s.glob("c-*") if (c / "cgroup.procs").read_text().strip()]
        if calls:
            return calls[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the tool call did not start")


def _restart(d: Agentcgd) -> None:
    d.stop(signal.SIGKILL)
    d.start()


def _ends(d: Agentcgd, session: str) -> list[dict]:
    log = [json.loads(x) for x in (d.runtime / "events.jsonl").read_text().splitlines()]
    return [e for e in log if e["type"] == "call.end" and e["session"] == session]


def _run_through_restart(d: Agentcgd, argv: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.Popen(argv, env=_env(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    call_dir = _wait_for_call(d.root, proc)
    _restart(d)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), call_dir.parent.name[2:]


def test_cli_run_returns_the_tools_status_across_a_kill_9(daemon):
    res, session = _run_through_restart(daemon, _cmd("agentcg", "agentcg.cli.main") +
                                        ["run", "--json", "--", "sh", "-c", TOOL])
    assert res.returncode == 7, res.stderr
    result = json.loads(res.stderr.strip().splitlines()[-1])
    assert result["exit_status"] == 7 and "unaccounted" not in result
    assert result["stats"]["memory_peak_bytes"] is not None and result["stats"]["wall_ns"] >= 2_900_000_000
    ends = _ends(daemon, session)
    assert len(ends) == 1 and ends[0]["exit_status"] == 7


def test_exec_wrapper_returns_the_tools_status_across_a_kill_9(daemon):
    res, session = _run_through_restart(daemon, _cmd("agentcg-exec", "agentcg.cli.hintexec") + ["-c", TOOL])
    assert res.returncode == 7, res.stderr
    assert "could not be accounted" not in res.stderr
    ends = _ends(daemon, session)
    assert len(ends) == 1 and ends[0]["exit_status"] == 7
    assert ends[0]["stats"]["memory_peak_bytes"] is not None


def test_client_returns_the_tools_status_across_a_kill_9(daemon):
    c = Client(daemon.socket)
    s = c.session("crash")
    h = s.tool_call("sleep").popen(["sh", "-c", TOOL])
    time.sleep(1)
    _restart(daemon)
    r = h.wait()
    assert r.exit_status == 7 and r.unaccounted is None
    assert r.stats["memory_peak_bytes"] is not None and r.stats["wall_ns"] >= 2_900_000_000
    ends = _ends(daemon, "crash")
    assert len(ends) == 1 and ends[0]["exit_status"] == 7 and ends[0]["stats"] == r.stats
    s.end()
    assert not (daemon.root / "s-crash").exists()


def test_client_keeps_the_status_when_the_daemon_stays_away(daemon):
    c = Client(daemon.socket, reconnect_timeout_s=1.0)
    s = c.session("away")
    h = s.tool_call("sleep").popen(["sh", "-c", "sleep 1; exit 7"])
    daemon.stop(signal.SIGKILL)
    r = h.wait()
    assert r.exit_status == 7 and "could not be accounted" in r.unaccounted
    daemon.start()
    assert Client(daemon.socket).show("away")["name"] == "away"


def test_cli_run_started_while_the_daemon_restarts_waits_for_it(daemon):
    """The socket refuses (the daemon died, systemd restarts it): agentcg run
    waits for it instead of failing with 125."""
    daemon.stop(signal.SIGKILL)
    proc = subprocess.Popen(_cmd("agentcg", "agentcg.cli.main") + ["run", "--", "sh", "-c", "exit 7"],
                            env=_env(daemon), stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    daemon.proc = subprocess.Popen(daemon.args, stderr=subprocess.PIPE)   # the stale socket stays until it binds
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 7, err
