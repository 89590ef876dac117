"""The kernel's OOM killer takes a tool call, never the agent (kernel lab).

A parent with a memory.max budget holds a session whose agent holds more
memory than its tool call; the call pushes the parent over the budget. The
memory cgroup's OOM killer picks the task with the largest resident memory
plus oom_score_adj/1000 of the budget: agentcgd sets the agent's
oom_score_adj to daemon.agent_oom_score_adj (-1000) and the call's to
daemon.call_oom_score_adj (+500) plus call_oom_priority_step (40) per priority
level below 10, with memory.oom.group on the call's cgroup.
So the call is killed whole, the agent survives and the call's result says
why in plain words. With both values 0 the same load kills the agent (the
larger process): the protection, not luck, decides.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentcg.adapters.procfs import read_oom_score_adj
from agentcg.client import Client
from conftest import daemon_dirs, require_cgroup2_controllers, remove_daemon_tree
from test_daemon_host import Agentcgd

pytestmark = pytest.mark.kernlab
MiB = 1 << 20

HOLD = r"""
import sys, time
b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b"\x01" * len(range(0, len(b), 4096))
print("ready", flush=True)
time.sleep(600)
"""

GROW = r"""
import sys, time
chunks = []
while True:
    b = bytearray(8 << 20); b[::4096] = b"\x01" * len(range(0, len(b), 4096)); chunks.append(b)
    time.sleep(0.01)
"""


def _daemon(request, tmp_path, extra: str = ""):
    root, runtime = daemon_dirs(request, require_cgroup2_controllers("memory", "pids", "cpu"))
    cfg = tmp_path / "agentcg.toml"
    cfg.write_text(f'[daemon]\nrequire_controllers = true\nlog_level = "warning"\n{extra}\n'
                   f'[policy]\npreset = "none"\n')
    d = Agentcgd(root, runtime, ["--config", str(cfg)], require_controllers=True).start()
    return d, root


def _cleanup(d, root: Path, procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    d.stop(signal.SIGKILL)
    remove_daemon_tree(root)


def _run(d, root: Path, procs: list):
    """A 160 MiB agent, a budget 240 MiB above what the daemon uses, a call
    that grows 8 MiB at a time until something is killed."""
    daemon_bytes = int((root / "daemon" / "memory.current").read_text())
    (root / "memory.max").write_text(str(daemon_bytes + 240 * MiB))
    c = Client(d.socket)
    s = c.session("agent1", intent="priority=5")
    agent = subprocess.Popen([sys.executable, "-c", HOLD, "160"], stdout=subprocess.PIPE)
    procs.append(agent)
    s.attach(agent.pid)
    assert agent.stdout.readline().strip() == b"ready"
    call = s.tool_call("grow").popen([sys.executable, "-c", GROW])
    deadline = time.monotonic() + 120
    adj = None
    while call.proc.poll() is None and agent.poll() is None and time.monotonic() < deadline:
        if adj is None:
            adj = read_oom_score_adj(call.proc.pid)
        time.sleep(0.05)
    agent_alive = agent.poll() is None
    if call.proc.poll() is None:
        call.kill()
    r = call.wait()
    events = (root / "memory.events").read_text()
    return agent, agent_alive, r, adj, events


def test_budget_oom_kills_the_tool_call_not_the_larger_agent(request, tmp_path):
    d, root = _daemon(request, tmp_path)
    procs: list = []
    try:
        agent, alive, r, call_adj, events = _run(d, root, procs)
        assert alive, f"the agent was killed; {events}"
        assert read_oom_score_adj(agent.pid) == -1000
        assert read_oom_score_adj(d.proc.pid) == -1000  # the daemon's leaf is inside the budget too
        assert call_adj == 500 + (10 - 5) * 40  # priority 5
        assert r.exit_status == 137, r.feedback_text()
        assert " oom_kill 0" not in " " + events.replace("\n", " "), events
        fb = [f for f in r.feedback if f["kind"] == "oom_kill"]
        assert fb, r.feedback
        assert "budget" in fb[0]["message"] and "agent keeps running" in fb[0]["message"]
        assert r.stats["memory_events"]["oom_kill"] >= 1
    finally:
        _cleanup(d, root, procs)


def test_without_the_adjustment_the_same_load_kills_the_agent(request, tmp_path):
    d, root = _daemon(request, tmp_path, "agent_oom_score_adj = 0\ncall_oom_score_adj = 0\ncall_oom_priority_step = 0\n")
    procs: list = []
    try:
        agent, alive, r, call_adj, events = _run(d, root, procs)
        assert call_adj == 0
        assert not alive, f"the agent survived without protection; {events}"
    finally:
        _cleanup(d, root, procs)
