"""The tracker sees real fork/exec/exit with the right pids and cgroup ids."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kill_and_remove, require_bpf, require_cgroup2

pytestmark = pytest.mark.kernel


@pytest.fixture
def test_cgroup():
    require_bpf()
    mnt = require_cgroup2()
    root = mnt / f"agentcg-test-tracker-{os.getpid()}"
    root.mkdir()
    leaf = root / "c-1"
    leaf.mkdir()
    yield root, leaf
    kill_and_remove(leaf, root)


def _tracker(root, prefer="tp_btf"):
    from agentcg.adapters.bpf import Tracker, objects_dir
    if not (objects_dir() / "tracker.bpf.o").exists():
        pytest.fail("bpf objects not built: run `make -C bpf`")
    return Tracker(root, prefer=prefer)


def _collect(tracker, until, timeout_s=5.0):
    events = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events += tracker.poll(100)
        if until(events):
            break
    return events


@pytest.mark.parametrize("flavor", ["tp_btf", "raw_tp"])
def test_fork_exec_exit_in_watched_cgroup(test_cgroup, flavor):
    """Both builds of the tracker (typed tp_btf, and the raw_tp fallback with
    probe reads) decode the same events."""
    from agentcg.adapters.bpf import cgroup_id
    root, leaf = test_cgroup
    leaf_id = cgroup_id(leaf)
    with _tracker(root, flavor) as tr:
        assert tr.flavor == flavor, tr.load_notes
        # a shell placed in the leaf before it forks: `sh -c 'sleep 0.1; exit 7'`
        r, w = os.pipe()
        proc = subprocess.Popen(["/bin/sh", "-c", "read x; /bin/sleep 0.1 ; exit 7"], stdin=r)
        os.close(r)
        (leaf / "cgroup.procs").write_text(str(proc.pid))
        os.write(w, b"go\n")
        os.close(w)
        proc.wait(timeout=10)
        evs = _collect(tr, lambda e: any(x.kind == "exit" and x.tgid == proc.pid for x in e))
        ours = [e for e in evs if e.cgroup_id == leaf_id]
        forks = [e for e in ours if e.kind == "fork" and e.ppid == proc.pid]
        assert forks, f"no fork seen from {proc.pid}: {evs}"
        child = forks[0].tgid
        execs = [e for e in ours if e.kind == "exec" and e.tgid == child]
        assert execs and execs[0].filename == "/bin/sleep" and execs[0].argv == ("/bin/sleep", "0.1")
        assert execs[0].comm == "sleep"
        exits = {e.tgid: e for e in ours if e.kind == "exit"}
        assert child in exits and exits[child].exit_code == 0
        assert proc.pid in exits and (exits[proc.pid].exit_code >> 8) == 7
        assert all(e.ts_ns > 0 for e in ours)
        assert forks[0].ts_ns <= execs[0].ts_ns <= exits[child].ts_ns
        st = tr.cg_stats(leaf_id)
        assert st["forks"] >= 1 and st["execs"] >= 1 and st["exits"] >= 2
        assert tr.lost_events == 0


def test_filter_ignores_processes_outside_the_subtree(test_cgroup):
    root, _leaf = test_cgroup
    with _tracker(root) as tr:
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        evs = _collect(tr, lambda e: False, timeout_s=0.3)
        assert not [e for e in evs if e.tgid == p.pid]


def test_runq_histogram_counts_waits_in_cgroup(test_cgroup):
    from agentcg.adapters.bpf import cgroup_id
    root, leaf = test_cgroup
    with _tracker(root) as tr:
        code = "import time\nfor _ in range(200): time.sleep(0.0005)"
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                                stdin=subprocess.PIPE)
        (leaf / "cgroup.procs").write_text(str(proc.pid))
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait(timeout=30)
        h = tr.runq_hist(cgroup_id(leaf))
        assert h["count"] >= 100, h
        assert h["p50_ns"] is not None and h["p99_ns"] >= h["p50_ns"]
