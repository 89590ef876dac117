"""A real agentcgd for the integration tests, on this host's cgroup2 mount
(placement, stats and events need no controllers). Import the fixture:

    from agentcgd_harness import agentcgd   # noqa: F401  (the fixture)
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_cgroup2
from daemon_proc import start_daemon


@dataclass
class Daemon:
    socket: str
    root: Path               # the daemon's cgroup root
    env: dict[str, str]      # os.environ with AGENTCG_SOCKET pointing at it


@pytest.fixture
def agentcgd(request):
    for d in start_daemon(request, require_cgroup2(), stop_signal=signal.SIGTERM):
        env = d.client_env(AGENTCG_CONFIG=str(d.runtime / "no-config.toml"))
        yield Daemon(d.socket, d.root, env)
