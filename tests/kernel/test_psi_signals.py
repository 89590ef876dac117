"""PSI triggers and kernfs change notifications on this host's cgroup2."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from agentcg.adapters.psi import PsiUnsupported, SignalWatch, read_psi

pytestmark = pytest.mark.kernel


def test_trigger_is_accepted_with_a_500ms_window_and_quiet_cgroup_stays_silent(scratch):
    if not (scratch / "memory.pressure").exists():
        pytest.skip("kernel without PSI (memory.pressure missing)")
    w = SignalWatch()
    try:
        assert w.watch_pressure("t", scratch, kind="some", stall_us=10_000, window_us=500_000)
        assert w.watch_pressure("t", scratch, kind="full", stall_us=50_000, window_us=1_000_000)
        armed = w.armed("t")
        # root with CAP_SYS_RESOURCE keeps 500 ms; without it the kernel takes 2 s windows
        assert armed[0] in (("memory.pressure", "some", 10_000, 500_000),
                            ("memory.pressure", "some", 40_000, 2_000_000))
        assert w.drain(0.05) == []  # nothing stalls in an empty cgroup
        with pytest.raises(PsiUnsupported):
            w.watch_pressure("bad", scratch, stall_us=600_000, window_us=500_000,
                             unprivileged_fallback=False)  # stall longer than the window
        assert "some" in read_psi((scratch / "memory.pressure").read_text())
    finally:
        w.close()


def test_gone_cgroup_is_false_not_an_error(scratch):
    w = SignalWatch()
    try:
        assert w.watch_pressure("x", scratch / "nope") is False
        assert w.watch_file("x", scratch / "nope", "cgroup.events") is False
    finally:
        w.close()


def test_events_file_change_wakes_the_watch_at_once(scratch):
    """cgroup.events flips to populated when a process enters: the same kernfs
    notification memory.events uses for a memory.high breach."""
    child = scratch / "c-1"
    child.mkdir()
    w = SignalWatch()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert w.watch_file("c-1", child, "cgroup.events")
        assert w.drain(0.02) == []
        t0 = time.monotonic_ns()
        (child / "cgroup.procs").write_text(str(proc.pid))
        got = w.drain(2.0)
        assert [(s.key, s.source, s.file) for s in got] == [("c-1", "events", "cgroup.events")]
        assert got[0].t_ns >= t0
        assert w.drain(0.02) == []  # re-armed, nothing new
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w.close()
        deadline = time.time() + 5
        while (child / "cgroup.procs").read_text().strip() and time.time() < deadline:
            time.sleep(0.01)
