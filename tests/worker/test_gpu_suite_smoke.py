"""bench/gpu_suite.sh --smoke: every part of the GPU-machine suite runs, tiny,
on this host, and the summary names each part with its results file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part_and_writes_its_results(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the tool-call overhead part needs root (cgroups)")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--smoke", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], summary)
    expected = {"kv_swap", "resume", "decode", "toolcall_overhead"}
    if (REPO / "bench" / "agent_jct").is_dir() or (REPO / "bench" / "agent_jct.py").exists():
        expected.add("agent_jct")
    assert expected <= set(parts), parts
    for name in expected:
        p = parts[name]
        assert p["status"] == "ok", p
        result = json.loads((tmp_path / p["result"]).read_text())
        assert result, name
    assert json.loads((tmp_path / "environment.json").read_text())["cpus"] >= 1
    assert summary["failed"] == []
