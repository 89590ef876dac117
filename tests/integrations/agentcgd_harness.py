"""A real agentcgd for the integration tests, on this host's cgroup2 mount
(placement, stats and events need no controllers). Import the fixture:

    from agentcgd_harness import agentcgd   # noqa: F401  (the fixture)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2


@dataclass
class Daemon:
    socket: str
    root: Path               # the daemon's cgroup root
    env: dict[str, str]      # os.environ with AGENTCG_SOCKET pointing at it


@pytest.fixture
def agentcgd(request):
    mnt = require_cgroup2()
    root, runtime = daemon_dirs(request, mnt)
    sock = runtime / "agentcg.sock"
    proc = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--cgroup-root", str(root),
                             "--runtime-dir", str(runtime), "--no-require-controllers", "--log-level", "warning"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"agentcgd exited: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("agentcgd did not start listening")
            time.sleep(0.02)
        env = dict(os.environ, AGENTCG_SOCKET=str(sock), AGENTCG_CONFIG=str(runtime / "no-config.toml"))
        for key in ("AGENTCG_SESSION", "AGENT_RESOURCE_HINT"):
            env.pop(key, None)
        yield Daemon(str(sock), root, env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if root.is_dir():
            remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
