"""Stop until placed, through the real daemon: a registered agent's child is
stopped in the kernel at its exec and continued once it is in its tool call,
so its first action already sees the call's cgroup; a daemon that hangs or is
killed while a child is stopped does not leave it stopped."""
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

from conftest import remove_daemon_tree, require_bpf, require_cgroup2
from agentcg.client import Client

pytestmark = pytest.mark.kernel

# The agent: "run PROG ARGS" starts PROG with its stdout piped, prints the pid,
# then the first line PROG wrote (PROG's own first action is reading its cgroup)
AGENT = r"""
import subprocess, sys
for line in sys.stdin:
    p = subprocess.Popen(line.split()[1:], stdout=subprocess.PIPE, text=True)
    print(p.pid, flush=True)
    print(p.stdout.readline().strip(), flush=True)
    p.wait()
"""
FIRST_ACTION = "/bin/grep ^0:: /proc/self/cgroup"   # its first act: read its own cgroup v2 path


def _start_daemon(tmp_tag: str, config: str):
    require_bpf()
    mnt = require_cgroup2()
    if not (Path(__file__).resolve().parents[2] / "bpf" / ".output" / "tracker.bpf.o").exists():
        pytest.fail("bpf objects not built: run `make -C bpf`")
    root, runtime = mnt / tmp_tag, Path("/tmp") / tmp_tag
    runtime.mkdir(mode=0o755, exist_ok=True)
    cfg = runtime / "agentcg.toml"
    cfg.write_text(config)
    proc = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--config", str(cfg), "--cgroup-root",
                             str(root), "--runtime-dir", str(runtime), "--no-require-controllers",
                             "--log-level", "warning"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (runtime / "agentcg.sock").exists():
        if proc.poll() is not None:
            pytest.fail(f"agentcgd exited: {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline, "agentcgd did not start"
        time.sleep(0.02)
    return proc, root, runtime


@pytest.fixture
def daemon_factory():
    started = []

    def make(config: str):
        d = _start_daemon(f"agentcg-test-{os.getpid()}-stop{len(started)}", config)
        started.append(d)
        return d
    yield make
    for proc, root, runtime in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)


def _wait(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    return pred()


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2]


def _agent_in_session(runtime: Path, name: str):
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with Client(str(runtime / "agentcg.sock")) as c:
        c.request("session.create", name=name)
        c.request("session.attach", name=name, pid=agent.pid)
        ok = _wait(lambda: c.request("status")["hooks"]["bpf"]["automatic_mode"]["agents"].get(name) == agent.pid)
        assert ok, c.request("status")["hooks"]["bpf"]
        feats = c.request("status")["hooks"]["bpf"]["features"]
    return agent, feats


def _run(agent, cmd: str) -> tuple[int, str]:
    agent.stdin.write(f"run {cmd}\n")
    agent.stdin.flush()
    return int(agent.stdout.readline()), agent.stdout.readline().strip()


def test_child_first_runs_in_its_call_cgroup(daemon_factory):
    proc, root, runtime = daemon_factory("[bpf]\nstop_until_placed = true\n")
    agent, feats = _agent_in_session(runtime, "stop1")
    try:
        assert feats["stop_until_placed"]["state"] == "used", feats
        for n in (1, 2, 3):
            pid, cgroup = _run(agent, FIRST_ACTION)
            # what the program saw as its first action: already the call's cgroup
            assert cgroup.endswith(f"/s-stop1/c-{n}"), (n, cgroup)
        events = [json.loads(x) for x in (runtime / "events.jsonl").read_text().splitlines()]
        auto = [e for e in events if e.get("type") == "call.auto"]
        assert len(auto) == 3 and all(e["stopped"] and e["continued_us"] > 0 for e in auto), auto
        with Client(str(runtime / "agentcg.sock")) as c:
            st = c.request("status")["hooks"]["bpf"]["automatic_mode"]["stop_until_placed"]
        assert st["stops"] == 3 and st["stop_failures"] == 0 and st["count"] == 3, st
    finally:
        agent.kill()
        agent.wait()


def test_stop_off_reports_it_and_leaves_children_running(daemon_factory):
    proc, root, runtime = daemon_factory("[bpf]\nstop_until_placed = false\n")
    agent, feats = _agent_in_session(runtime, "stop0")
    try:
        assert feats["stop_until_placed"]["state"] == "off", feats
        pid, cgroup = _run(agent, FIRST_ACTION)
        assert "/s-stop0/" in cgroup
        events = [json.loads(x) for x in (runtime / "events.jsonl").read_text().splitlines()]
        assert not any(e.get("stopped") for e in events if e.get("type") == "call.auto")
    finally:
        agent.kill()
        agent.wait()


def test_hung_daemon_child_is_continued_after_the_bound(daemon_factory):
    proc, root, runtime = daemon_factory("[bpf]\nstop_timeout_ms = 300\n")
    agent, _ = _agent_in_session(runtime, "stop2")
    try:
        os.kill(proc.pid, signal.SIGSTOP)      # alive, but consumes no events
        try:
            pid, cgroup = _run(agent, FIRST_ACTION)   # returns only once the child ran
            assert cgroup.endswith("/s-stop2/agent"), cgroup   # not placed: the watchdog continued it
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        agent.kill()
        agent.wait()


def test_killed_daemon_child_stopped_at_exec_is_continued(daemon_factory):
    proc, root, runtime = daemon_factory("[bpf]\nstop_timeout_ms = 60000\n")
    agent, _ = _agent_in_session(runtime, "stop3")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        agent.stdin.write(f"run {FIRST_ACTION}\n")
        agent.stdin.flush()
        pid = int(agent.stdout.readline())
        assert _wait(lambda: _state(pid) == "T", 5), _state(pid)   # stopped in the kernel at exec
        time.sleep(0.3)
        assert _state(pid) == "T"                 # and stays stopped: nobody placed it
        proc.kill()                               # SIGKILL: no clean shutdown
        proc.wait(10)
        # the watchdog sees the daemon's pipe close and continues it (well before the 60 s bound)
        assert agent.stdout.readline().strip().endswith("/s-stop3/agent")
    finally:
        agent.kill()
        agent.wait()
