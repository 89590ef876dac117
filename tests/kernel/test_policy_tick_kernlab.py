"""Smoke run of bench/policy_tick.py in the kernel lab: both tick variants
run over a real tree, and a tool call allocating past its memory.high gets
the policy's write through the kernel's change notification, every round."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2_controllers

pytestmark = pytest.mark.kernlab
REPO = Path(__file__).resolve().parents[2]


def test_policy_tick_bench_runs_and_every_breach_is_acted_on(tmp_path):
    require_cgroup2_controllers("memory", "cpu", "pids")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "policy_tick.py"), "--sessions", "2", "--calls", "2",
                        "--ticks", "5", "--rounds", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "policy_tick.json").read_text())
    for variant in ("kept_open", "by_path"):
        assert res["tick"][variant]["tick_us"]["n"] == 5
        assert res["tick"][variant]["snapshot_us"]["p50"] > 0
    b = res["breach"]
    assert b["missed"] == 0 and b["mark_to_write_ms"]["n"] == 3
    assert b["call_memory_high_bytes"] and min(b["call_memory_high_bytes"]) > 0
    assert b["daemon_signal_to_action_us"]["count"] >= 1  # at least one write came straight from a memory.events wake-up
    assert not [p for p in Path("/sys/fs/cgroup").glob("agentcg-bench-tick-*")]  # its tree is gone
