"""The tracker names the OOM killer's victim and its cgroup (needs the memory
controller: kernel lab)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import require_bpf, require_cgroup2_controllers

pytestmark = pytest.mark.kernlab


def test_oom_victim_event_and_counter():
    require_bpf()
    mnt = require_cgroup2_controllers("memory")
    from agentcg.adapters.bpf import Tracker, cgroup_id
    root = mnt / f"agentcg-test-oom-{os.getpid()}"
    leaf = root / "c-1"
    root.mkdir()
    try:
        if "memory" not in (mnt / "cgroup.subtree_control").read_text().split():
            (mnt / "cgroup.subtree_control").write_text("+memory")
        (root / "cgroup.subtree_control").write_text("+memory")
        leaf.mkdir()
        (leaf / "memory.max").write_text(str(32 << 20))
        if (leaf / "memory.swap.max").exists():
            (leaf / "memory.swap.max").write_text("0")
        with Tracker(root, runq=False) as tr:
            hog = subprocess.Popen(["/bin/sh", "-c", "read x; exec python3 -c 'b = bytearray(256 << 20); print(len(b))'"],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            (leaf / "cgroup.procs").write_text(str(hog.pid))
            hog.stdin.write(b"go\n")
            hog.stdin.close()
            rc = hog.wait(timeout=120)
            assert rc == -9, f"hog was not OOM-killed (rc {rc})"
            events = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(e.kind == "oom" for e in events):
                events += tr.poll(100)
            ooms = [e for e in events if e.kind == "oom"]
            assert ooms, events
            assert ooms[0].tgid == hog.pid and ooms[0].cgroup_id == cgroup_id(leaf)
            assert ooms[0].comm.startswith("python")
            assert tr.cg_stats(cgroup_id(leaf))["oom_kills"] == 1
    finally:
        for d in (leaf, root):
            try:
                d.rmdir()
            except OSError:
                pass
