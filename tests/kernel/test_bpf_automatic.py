"""Automatic mode through the real daemon: an agent registered by pid gets one
tool call per process it starts; escapes are detected and reported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_bpf, require_cgroup2
from daemon_proc import poll, start_daemon
from agentcg.client import Client

pytestmark = pytest.mark.kernel

AGENT = r"""
import subprocess, sys
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "sh":
        cmd = ["run", "/bin/sh", "-c", line[3:].strip()]
    if cmd[0] == "run":
        p = subprocess.Popen(cmd[1:])
        print(p.pid, flush=True)
        p.wait()
        print("done", p.returncode, flush=True)
    elif cmd[0] == "start":
        p = subprocess.Popen(cmd[1:])
        print(p.pid, flush=True)
"""


@pytest.fixture
def agentcgd(request):
    require_bpf()
    mnt = require_cgroup2()
    if not (Path(__file__).resolve().parents[2] / "bpf" / ".output" / "tracker.bpf.o").exists():
        pytest.fail("bpf objects not built: run `make -C bpf`")
    # automatic mode's rules come from the config
    rules = '[[auto_rules]]\ncommand = "sleep"\nintent = { pids_max = 77, cpu = "batch" }\nname = "sleepers"\n'
    for d in start_daemon(request, mnt, config=rules):
        yield d.root, d.runtime, Path(d.socket)


def _events(runtime, kind):
    try:
        lines = (runtime / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [e for e in map(json.loads, lines) if e.get("type") == kind]


def test_child_of_attached_agent_gets_its_own_call_and_escape_is_reported(agentcgd):
    root, runtime, sock = agentcgd
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with Client(str(sock)) as c:
            c.request("session.create", name="auto1")
            c.request("session.attach", name="auto1", pid=agent.pid)
            st = c.request("status")
            bpf = st["hooks"]["bpf"]
            assert bpf["features"]["tracker"]["state"] == "used", bpf
            # wait until the hook has registered the agent
            assert poll(lambda: c.request("status")["hooks"]["bpf"]["automatic_mode"]["agents"].get("auto1")
                         == agent.pid), c.request("status")["hooks"]["bpf"]

            agent.stdin.write("run /bin/sleep 0.5\n")
            agent.stdin.flush()
            child = int(agent.stdout.readline())
            cg = poll(lambda: Path(f"/proc/{child}/cgroup").read_text().strip().split("::")[-1]
                       if "/c-" in Path(f"/proc/{child}/cgroup").read_text() else None, 5)
            assert cg and cg.endswith("/s-auto1/c-1"), Path(f"/proc/{child}/cgroup").read_text()
            assert agent.stdout.readline().split() == ["done", "0"]
            ended = poll(lambda: [e for e in _events(runtime, "call.end") if e["call"] == 1])
            assert ended, "auto call did not end when its root exited"
            extra = ended[0]["stats"]["extra"]
            assert extra["exec_count"] >= 0 and extra["proc_count"] >= 1
            auto = _events(runtime, "call.auto")
            assert auto and auto[0]["pid"] == child and auto[0]["placement_us"] > 0
            assert "sleepers" in auto[0]["reason"], auto[0]
            assert ended[0]["limits"]["pids_max"] == 77 and ended[0]["limits"]["cpu_weight"] == 25, ended[0]

            # escape: a background child whose parent exits (re-parented). The shell first
            # runs long enough to be placed: placement happens after exec (see docs/bpf.md)
            agent.stdin.write("sh /bin/sleep 0.3; /bin/sleep 30 & exit 0\n")
            agent.stdin.flush()
            child2 = int(agent.stdout.readline())
            assert agent.stdout.readline().split()[0] == "done"
            esc = poll(lambda: _events(runtime, "call.escape"))
            assert esc, "no escape reported"
            e = esc[0]
            assert e["session"] == "auto1" and e["call"] == 2 and e["comm"] in ("sleep", "sh")
            assert e["pid"] != child2
    finally:
        agent.kill()
        agent.wait()
