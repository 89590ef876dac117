"""A one-minute soak of the real daemon on this host's cgroup2 tree: 64
sessions, each with its own client connection, making tool calls at 20 per
second in all (bench/soak.py, which runs the same for ten minutes and records
timings; none are asserted here)."""
from __future__ import annotations

import shutil

import pytest

from bench.soak import SoakDaemon, SoakSpec, leftover_calls, soak
from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2

pytestmark = pytest.mark.kernel

SPEC = SoakSpec(sessions=64, rate_per_s=20.0, duration_s=60.0, window_s=20.0, sample_s=1.0, warmup_s=5.0)
# The daemon's steady state holds nothing per call once it has ended (the
# event log is a file; the policy keeps fixed-size deques). bench/soak.py's
# ten-minute run (12k calls) grew 1.4 MiB in all, in steps of the allocator's
# arenas. Between the first and the last 20 s window here ~800 calls are made:
# a leak of 5 KiB a call (one kept dict with its stats and argv) would exceed
# this bound.
RSS_GROWTH_MAX_BYTES = 4 << 20


@pytest.fixture
def soak_daemon(request):
    root, runtime = daemon_dirs(request, require_cgroup2())
    d = SoakDaemon(root, runtime)
    yield d
    d.stop()
    remove_daemon_tree(root)
    shutil.rmtree(runtime, ignore_errors=True)


def test_one_minute_soak_has_no_errors_and_flat_rss_and_fds(soak_daemon):
    r = soak(SPEC, str(soak_daemon.socket), soak_daemon.pid)
    assert r["errors"] == 0, r["error_texts"]
    assert soak_daemon.proc.poll() is None
    assert leftover_calls(soak_daemon.root) == []
    # every window made calls (no stall), across all the sessions
    assert all(w["calls"] > 0 for w in r["windows"]), r["windows"]
    assert r["calls"] >= SPEC.sessions
    # descriptors: the idle baseline (minimum in a window) is the same at the end
    assert r["fds_first"] == r["fds_last"], r["windows"]
    assert r["rss_last_bytes"] - r["rss_first_bytes"] < RSS_GROWTH_MAX_BYTES, r["windows"]
