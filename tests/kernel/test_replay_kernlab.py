"""Smoke run of the replay benchmark in the kernel lab: real agent and tool-call
processes through a real agentcgd, two policies, results written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2_controllers

pytestmark = pytest.mark.kernlab
TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "dev"


def _logs(run_dir: Path) -> str:
    """The agents' and the daemon's logs of one policy's run, for a failure message."""
    parts = []
    for f in sorted(run_dir.glob("*.log")):
        parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}")
    return "\n".join(parts) or f"(no logs in {run_dir})"


def test_replay_runs_end_to_end_and_adaptive_loses_no_agent(tmp_path):
    require_cgroup2_controllers("memory", "cpu", "pids")
    trace = TRACES / "haiku__matrix-org__synapse-6145.json"
    if not trace.exists():
        pytest.skip(f"trace {trace} not present")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "bench.replay", "--traces", str(trace), "--sessions", "2",
                        "--speedup", "20", "--mem-scale", "0.25", "--budget-mult", "1.0",
                        "--policies", "none,adaptive", "--no-plots", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "replay.json").read_text())
    pols = {p["policy"]: p for p in res["policies"]}
    assert set(pols) == {"none", "adaptive"}
    for p in pols.values():
        for key in ("agents_killed", "toolcalls_killed", "oom_events", "high_jct_vs_solo_p50",
                    "low_jct_vs_solo_p50", "mem_peak_mb", "mem_mean_mb", "reaction_p99_ms", "budget_mb",
                    "unlimited_peak_mb"):
            assert key in p
        # the trace's 5 calls, in each of the 2 sessions
        assert p["tool_calls"] == 10, (p["policy"], p["agent_returncodes"], _logs(out / "replay-runs" / p["policy"]))
    assert pols["adaptive"]["agents_killed"] == 0
    assert res["params"]["budget_mb"] > 0 and res["params"]["unlimited_peak_mb"] > 0
    assert "| (d) agentcg adaptive |" in (out / "replay.md").read_text()
