"""Containment on real cgroup v2 (kernel lab), through bench/containment.py:
a fork bomb and a memory bomb, each in one tool call of its own session,
while another session runs a steady loop of small tool calls. The bomb is
stopped (held at pids.max, or killed at memory.max), every steady call
finishes with status 0 within a generous deadline (a timeout, not a timing
assertion), and the same daemon answers status throughout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2_controllers

pytestmark = pytest.mark.kernlab
REPO = Path(__file__).resolve().parents[2]


def test_bombs_are_stopped_and_the_steady_session_finishes(tmp_path):
    require_cgroup2_controllers("memory", "cpu", "pids")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "containment.py"), "--calls", "3", "--work-iters", "1000",
                        "--fork-pids", "32", "--mem-max", "256M", "--deadline-s", "240",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "containment.json").read_text())
    for kind in ("fork", "memory"):
        run = res[kind]
        for phase in ("steady_alone_before", "steady_with_bomb", "steady_alone_after"):
            assert (run[phase]["calls"], run[phase]["ok"]) == (3, 3), (kind, phase, run[phase])
        assert run["steady_all_finished"]
        assert run["bomb"]["stopped"], run["bomb"]
    fork = res["fork"]["bomb"]
    assert fork["pids_peak"] <= 32 and fork["pids_events_max"] >= 1
    assert fork["stragglers_action"] == "killed"
    mem = res["memory"]["bomb"]
    assert mem["exit_status"] == 137 and mem["memory_peak_bytes"] <= 256 << 20
    assert res["daemon"]["same_pid_throughout"] and res["daemon"]["exit_status"] == 0
    assert not [p for p in Path("/sys/fs/cgroup").glob("agentcg-bench-containment-*")]   # its tree is gone
