"""The chaos benchmark in small (bench/chaos.py): 100 tool calls from six
sessions (client and `agentcg run` CLI) while agentcgd is kill -9ed at random
moments and restarted. Any cgroup2 mount will do (no controllers needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.chaos import run_chaos  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_kill_9_at_random_loses_no_status_event_or_cgroup():
    require_cgroup2()
    res = run_chaos(calls=100, cli_share=0.2, interval_s=(0.2, 0.8), seed=7)
    assert res["kills"] >= 3 and res["restarts"] == res["kills"]
    assert res["wrong_or_lost_statuses"] == 0, res["examples"]["wrong"]
    assert res["unaccounted_calls"] == 0
    assert res["missing_end_events"] == 0 and res["duplicate_end_events"] == 0, res["examples"]
    assert res["wrong_status_in_events"] == 0, res["examples"]["wrong_event"]
    assert res["leaked_call_cgroups"] == 0, res["examples"]["leaked"]
