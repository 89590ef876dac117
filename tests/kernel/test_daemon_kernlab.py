"""Real enforcement with cgroup v2 memory/pids/cpu controllers (kernel lab):
memory intents stop a hog with the right feedback numbers, pids.max stops a
fork bomb in its own call only, stats match what the process did, and a
kill -9 of the daemon mid-call loses nothing."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import require_cgroup2_controllers
from daemon_proc import poll
from test_daemon_host import start_daemon
from agentcg.client import Client

pytestmark = pytest.mark.kernlab
MiB = 1 << 20


@pytest.fixture
def vdaemon(request):
    mnt = require_cgroup2_controllers("memory", "pids", "cpu")
    yield from start_daemon(request, mnt, require_controllers=True)


def test_memory_intent_stops_a_256m_hog_with_numbers(vdaemon):
    # the daemon's own cgroup outweighs the calls it has to act on (daemon.cpu_weight)
    assert (vdaemon.root / "daemon" / "cpu.weight").read_text().strip() == "10000"
    c = Client(vdaemon.socket)
    # no session cap: the call's own declared memory_max is the only limit
    with c.session("mem") as s:
        # the hog touches 256 MiB from user space (b"x" * n fills every page)
        r = s.tool_call("hog", intent="memory=64M,memory_max=64M").run(
            [sys.executable, "-S", "-c", "b = b'x' * (256 << 20)"], stderr=subprocess.DEVNULL)
        assert r.limits["memory_max_bytes"] == 64 * MiB
        assert r.exit_status == 137                         # OOM-killed at memory.max
        assert r.stats["memory_events"]["oom_kill"] >= 1
        assert 48 * MiB <= r.stats["memory_peak_bytes"] <= 64 * MiB
        fb = {f["kind"]: f for f in r.feedback}
        assert fb["oom_kill"]["numbers"]["memory_max_bytes"] == 64 * MiB
        assert "memory.max of 64M" in fb["oom_kill"]["message"]
        # a call without a memory intent in the same session is not limited at 64M
        ok = s.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"], stderr=subprocess.DEVNULL)
        assert ok.exit_status == 0 and ok.feedback == []
        assert ok.stats["memory_peak_bytes"] >= 100 * MiB     # stats match what dd allocated


def test_call_clamped_to_session_budget(vdaemon):
    c = Client(vdaemon.socket)
    with c.session("budget", intent="memory_max=96M") as s:
        call = s.tool_call("dd", intent="memory_max=1G")
        r = call.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"], stderr=subprocess.DEVNULL)
        assert r.limits["memory_max_bytes"] == 96 * MiB
        assert call.handle.adjustments[0]["field"] == "memory_max"
        assert r.exit_status == 137 and r.stats["memory_peak_bytes"] <= 96 * MiB


def test_pids_max_stops_a_fork_bomb_in_its_call_only(vdaemon):
    c = Client(vdaemon.socket)
    with c.session("bomb") as s:
        bomb = s.tool_call("bomb", intent="pids=16").popen(
            ["sh", "-c", "for i in $(seq 40); do sleep 3 & done 2>/dev/null; wait"])
        other = s.run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; "
                                   "do sleep 0.2 & done; wait; echo ok"], stdout=subprocess.PIPE)
        assert other.exit_status == 0 and other.stdout == b"ok\n"
        assert other.stats["pids_peak"] >= 20 and other.feedback == []
        r = bomb.wait()
        assert r.stats["pids_peak"] == 16
        assert r.stats["pids_events_max"] >= 1
        fb = {f["kind"]: f for f in r.feedback}
        assert fb["pids_max"]["numbers"]["pids_max"] == 16


def test_kill_9_daemon_mid_call_loses_nothing(vdaemon):
    c = Client(vdaemon.socket)
    s = c.session("crash9")
    h = s.tool_call("dd").popen(["sh", "-c", "dd if=/dev/zero of=/dev/null bs=80M count=1 2>/dev/null; "
                                             "sleep 2; exit 5"])
    call_dir = vdaemon.root / "s-crash9" / f"c-{h.number}"
    vdaemon.stop(signal.SIGKILL)
    vdaemon.start()
    r = h.wait()
    assert r.exit_status == 5
    assert r.stats["memory_peak_bytes"] >= 80 * MiB
    assert r.stats["wall_ns"] >= 2_000_000_000
    # the daemon removes an ended call's cgroup right after its reply
    assert poll(lambda: not call_dir.exists(), 30)
    s.end()
    assert not (vdaemon.root / "s-crash9").exists()


def test_memory_high_throttles_and_says_so(vdaemon):
    c = Client(vdaemon.socket)
    with c.session("high") as s:
        # 33 MiB against a 32 MiB memory.high: a little over, so the throttling stays short
        r = s.tool_call("dd", intent="memory=32M,memory_max=512M").run(
            ["dd", "if=/dev/zero", "of=/dev/null", "bs=33M", "count=1"], stderr=subprocess.DEVNULL)
        assert r.exit_status == 0                        # throttled, not killed
        assert r.limits["memory_high_bytes"] == 32 * MiB
        assert r.stats["memory_events"]["high"] >= 1 and r.stats["memory_events"]["oom_kill"] == 0
        assert r.stats["memory_peak_bytes"] >= 32 * MiB
        fb = {f["kind"]: f for f in r.feedback}
        assert fb["memory_high"]["numbers"]["memory_high_bytes"] == 32 * MiB
        assert "memory.high of 32M" in fb["memory_high"]["message"]
