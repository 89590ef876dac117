"""The sched_ext scheduler in the kernel lab: loads, favours the high-priority
cgroup under CPU contention (run-queue latency measured by the tracker), and
unloads leaving sched_ext disabled."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require_bpf, require_cgroup2, require_sched_ext

pytestmark = pytest.mark.kernlab

HOG = ["/bin/sh", "-c", "read x; while :; do :; done"]


def _wait_disabled(timeout_s: float = 10.0) -> str | None:
    """An earlier owner's scheduler (e.g. a killed agentcgd) is unloaded asynchronously."""
    from agentcg.adapters.bpf import sched_ext_state
    deadline = time.monotonic() + timeout_s
    state = sched_ext_state()
    while state != "disabled" and time.monotonic() < deadline:
        time.sleep(0.05)
        state = sched_ext_state()
    return state


def _hog(cg: Path) -> subprocess.Popen:
    p = subprocess.Popen(HOG, stdin=subprocess.PIPE)
    (cg / "cgroup.procs").write_text(str(p.pid))
    return p


def test_high_priority_cgroup_waits_less_and_unload_disables():
    require_sched_ext()
    require_bpf()
    mnt = require_cgroup2()
    from agentcg.adapters.bpf import SchedExt, Tracker, cgroup_id, sched_ext_ops, sched_ext_state
    if _wait_disabled() != "disabled":
        pytest.fail(f"another sched_ext scheduler stays loaded ({sched_ext_ops()})")
    root = mnt / f"agentcg-test-sched-{os.getpid()}"
    hi, lo = root / "s-hi", root / "s-lo"
    for d in (root, hi, lo):
        d.mkdir()
    hogs: list[subprocess.Popen] = []
    try:
        with Tracker(root) as tr:
            sched = SchedExt()
            try:
                deadline = time.monotonic() + 10
                while sched.ejected() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert sched.ejected() is None, sched.ejected()
                assert sched_ext_ops() == "agentcg"
                sched.set_weight(cgroup_id(hi), 1000)
                sched.set_weight(cgroup_id(lo), 10)
                ncpu = os.cpu_count() or 2
                hogs = [_hog(hi) for _ in range(ncpu)] + [_hog(lo) for _ in range(ncpu)]
                for h in hogs:
                    h.stdin.write(b"go\n")
                    h.stdin.flush()
                time.sleep(4.0)
                assert sched.ejected() is None, sched.ejected()
                h_hi, h_lo = tr.runq_hist(cgroup_id(hi)), tr.runq_hist(cgroup_id(lo))
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
                state = sched.close()
        assert state == "disabled"
        assert h_hi["count"] > 0 and h_lo["count"] > 0, (h_hi, h_lo)
        mean_hi = h_hi["sum_ns"] / h_hi["count"]
        mean_lo = h_lo["sum_ns"] / h_lo["count"]
        ratio = mean_lo / mean_hi
        print(f"runq mean wait: high {mean_hi / 1e3:.0f} us ({h_hi['count']} waits), "
              f"low {mean_lo / 1e3:.0f} us ({h_lo['count']} waits), ratio {ratio:.1f}")
        assert ratio > 2.0, (mean_hi, mean_lo)
    finally:
        for h in hogs:
            if h.poll() is None:
                h.kill()
                h.wait()
        for d in (hi, lo, root):
            try:
                d.rmdir()
            except OSError:
                pass



def test_scheduler_is_unloaded_when_its_process_dies():
    """Link-based registration: a killed owner leaves sched_ext disabled."""
    require_sched_ext()
    require_bpf()
    import sys
    from agentcg.adapters.bpf import sched_ext_state
    if _wait_disabled() != "disabled":
        pytest.fail("another sched_ext scheduler stays loaded")
    code = ("from agentcg.adapters.bpf import SchedExt, sched_ext_state; import sys, time\n"
            "s = SchedExt()\nprint(sched_ext_state(), flush=True)\ntime.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() in ("enabled", "enabling")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while sched_ext_state() != "disabled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched_ext_state() == "disabled"
