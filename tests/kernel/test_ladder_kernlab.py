"""The memory ladder on a real kernel (cgroup v2 memory controller; kernel lab).

- a low-priority memory hog is frozen, not killed, while a high-priority
  session allocates, and is thawed afterwards;
- a tool call that alone outgrows its session's hard cap is the only thing
  killed, and the agent gets the feedback;
- the agent processes survive in every case.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentcg.client import Client
from conftest import daemon_dirs, require_cgroup2_controllers, remove_daemon_tree
from test_daemon_host import Agentcgd

pytestmark = pytest.mark.kernlab
MiB = 1 << 20

ALLOC = r"""
import sys, time
first, step, every_s, top = (float(x) for x in sys.argv[1:5])
hold_s = float(sys.argv[5]) if len(sys.argv) > 5 else -1
chunks = []
def grow(mb):
    b = bytearray(int(mb * 1048576)); b[::4096] = b"\x01" * len(range(0, len(b), 4096)); chunks.append(b)
grow(first)
held = first
while held < top:
    time.sleep(every_s); grow(step); held += step
if hold_s >= 0:
    time.sleep(hold_s); sys.exit(0)
while True:
    time.sleep(every_s); grow(step)
"""

CONFIG = """
[daemon]
require_controllers = true
log_level = "warning"
[policy]
rules = [
  { name = "psi_pressure" },
  { name = "burst_borrow", args = { default_call_bytes = "32M", step_min_bytes = "64M" } },
  { name = "call_cap" },
  { name = "throttle" },
  { name = "reclaim", args = { escalate_after_ns = "20ms" } },
  { name = "freeze", args = { escalate_after_ns = "50ms" } },
  { name = "kill", args = { escalate_after_ns = "120s", deadlock_ns = "120s" } },
]
[policy.ladder]
calm_hold_ns = "300ms"
"""


class LoggedAgentcgd(Agentcgd):
    """The daemon with its log in a file (shown when a test fails)."""

    def start(self):
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self.args, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 120
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agentcgd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture
def pdaemon(request, tmp_path):
    root, runtime = daemon_dirs(request, require_cgroup2_controllers("memory", "pids", "cpu"))
    cfg = tmp_path / "agentcg.toml"
    cfg.write_text(CONFIG)
    d = LoggedAgentcgd(root, runtime, ["--config", str(cfg), "--log-level", "info"], require_controllers=True)
    d.log = tmp_path / "agentcgd.log"
    d.start()
    sleepers: list[subprocess.Popen] = []
    d.sleepers = sleepers
    yield d
    d.stop(signal.SIGKILL)
    for p in sleepers:
        p.kill()
        p.wait()
    remove_daemon_tree(root)


def _agent(d, client: Client, name: str, intent: str):
    s = client.session(name, intent=intent)
    p = subprocess.Popen(["sleep", "600"])
    d.sleepers.append(p)
    s.attach(p.pid)
    return s, p


def _read(cg: str, name: str) -> str:
    try:
        return (Path(cg) / name).read_text()
    except OSError:
        return ""


def test_low_priority_hog_is_frozen_not_killed_and_thawed_after(pdaemon):
    (pdaemon.root / "memory.max").write_text(str(900 * MiB))
    c = Client(pdaemon.socket)
    lo, lo_agent = _agent(pdaemon, c, "lo", "priority=1")
    hi, hi_agent = _agent(pdaemon, c, "hi", "priority=9")
    hog = lo.tool_call("hog").popen([sys.executable, "-c", ALLOC, "300", "10", "0.1", "450", "600"])
    deadline = time.monotonic() + 60
    while int(_read(hog.cgroup, "memory.current") or 0) < 320 * MiB:
        assert time.monotonic() < deadline, "hog never reached 300M"
        assert hog.proc.poll() is None
        time.sleep(0.05)
    big = hi.tool_call("big").popen([sys.executable, "-c", ALLOC, "50", "50", "0.1", "400", "2"])
    seen_frozen = False
    while big.proc.poll() is None:
        if _read(hog.cgroup, "cgroup.freeze").strip() == "1":
            seen_frozen = True
        time.sleep(0.02)
    r = big.wait()
    assert r.exit_status == 0, r.feedback_text()
    assert r.stats["memory_peak_bytes"] >= 400 * MiB
    assert seen_frozen, "\n".join(a["line"] for a in c.status()["hooks"]["policy"]["last_actions"])
    # pressure gone: the hog is thawed (calm hold 300 ms) and still alive
    deadline = time.monotonic() + 30
    while _read(hog.cgroup, "cgroup.freeze").strip() != "0":
        if time.monotonic() > deadline:
            pol = c.status()["hooks"]["policy"]
            print({k: v for k, v in pol.items() if k != "last_actions"})
            print("\n".join(a["line"] for a in pol["last_actions"]))
            print(pdaemon.tail())
            pytest.fail("hog was never thawed")
        time.sleep(0.05)
    acts = c.status()["hooks"]["policy"]["last_actions"]
    assert hog.proc.poll() is None, "\n".join(a["line"] for a in acts)
    kinds = [(a["kind"], a["target"]) for a in acts]
    assert ("freeze", "s-lo/c-1") in kinds and ("thaw", "s-lo/c-1") in kinds
    assert not any(k == "kill" for k, _t in kinds)
    assert all(a["reason"]["rule"] for a in acts)
    hog.kill()
    hr = hog.wait()
    assert hr.stats["extra"]["policy"]["froze"] is True
    assert lo_agent.poll() is None and hi_agent.poll() is None
    assert int(_read(str(pdaemon.root), "memory.events").split("oom_kill ")[1].split()[0]) == 0


def test_call_alone_over_its_session_cap_is_the_only_thing_killed(pdaemon):
    c = Client(pdaemon.socket)
    s, agent = _agent(pdaemon, c, "capped", "priority=5,memory_max=300M")
    other = s.tool_call("quiet").popen(["sleep", "30"])
    r = s.tool_call("hungry").popen([sys.executable, "-c", ALLOC, "20", "20", "0.05", "600", "5"]).wait()
    assert r.exit_status == 137
    text = " ".join(f["message"] for f in r.feedback) + " ".join(
        (r.stats.get("extra", {}).get("policy") or {}).get("feedback", []))
    assert "memory" in text and ("exceeds" in text or "memory.max" in text), text
    assert agent.poll() is None          # the agent survived
    assert other.proc.poll() is None     # the other call of the session too
    other.kill()
    other.wait()
