"""`agentcg run` on real cgroup v2 controllers (kernel lab): an OOM kill exits
137 and the feedback reaches stderr in plain words with the numbers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2_controllers
from test_daemon_host import start_daemon

pytestmark = pytest.mark.kernlab


@pytest.fixture
def vdaemon(request):
    mnt = require_cgroup2_controllers("memory", "pids", "cpu")
    yield from start_daemon(request, mnt, require_controllers=True)


def test_run_oom_exits_137_with_feedback_on_stderr(vdaemon):
    env = dict(os.environ, AGENTCG_SOCKET=vdaemon.socket)
    env.pop("AGENTCG_SESSION", None)
    res = subprocess.run(
        [sys.executable, "-m", "agentcg.cli.main", "run", "--intent", "memory=64M,memory_max=64M", "--",
         sys.executable, "-S", "-c", "b = b'x' * (256 << 20)"],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(vdaemon.socket).parent)
    assert res.returncode == 137, res.stderr
    feedback = [line for line in res.stderr.splitlines() if line.startswith("agentcg: ")]
    assert feedback, res.stderr
    assert any("memory.max of 64M" in line for line in feedback), feedback
