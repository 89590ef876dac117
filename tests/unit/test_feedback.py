"""Feedback: plain words, the right numbers, an actionable suggestion."""
from __future__ import annotations

from agentcg.core.feedback import feedback
from agentcg.core.model import CallStats, Limits

MiB = 1 << 20


def test_quiet_call_gives_no_feedback():
    assert feedback(CallStats(memory_peak_bytes=10 * MiB, memory_events={"high": 0, "max": 0}),
                    Limits(memory_high_bytes=64 * MiB)) == []


def test_oom_kill_names_limit_peak_and_suggests_narrower_pytest():
    items = feedback(CallStats(memory_peak_bytes=64 * MiB,
                               memory_events={"high": 0, "max": 5, "oom": 1, "oom_kill": 1}),
                     Limits(memory_max_bytes=64 * MiB), argv=["python", "-m", "pytest", "tests"])
    assert [i.kind for i in items] == ["oom_kill"]
    it = items[0]
    assert "memory.max of 64M" in it.message and "peak 64M" in it.message
    assert "pytest tests/test_x.py" in it.suggestion
    assert "memory_max=128M" in it.suggestion
    assert it.numbers["memory_max_bytes"] == 64 * MiB and it.numbers["oom_kill"] == 1


def test_oom_kill_at_the_shared_budget_says_so_and_that_the_agent_keeps_running():
    # oom_kill without oom: a limit above the call was reached (the shared budget)
    items = feedback(CallStats(memory_peak_bytes=40 * MiB,
                               memory_events={"high": 0, "max": 0, "oom": 0, "oom_kill": 3}),
                     Limits(), argv=["python", "-m", "pytest", "tests"])
    assert [i.kind for i in items] == ["oom_kill"]
    it = items[0]
    assert "budget" in it.message and "killed 3 processes" in it.message and "peak 40M" in it.message
    assert "agent keeps running" in it.message and "memory.max of max" not in it.message
    assert "pytest tests/test_x.py" in it.suggestion


def test_throttled_at_high():
    items = feedback(CallStats(memory_peak_bytes=70 * MiB, memory_events={"high": 12}),
                     Limits(memory_high_bytes=64 * MiB, memory_max_bytes=1 << 30), argv=["make", "-j8"])
    assert [i.kind for i in items] == ["memory_high"]
    assert "memory.high of 64M 12 times (peak 70M)" in items[0].message
    assert "declare memory=" in items[0].suggestion.lower() and "-j2" in items[0].suggestion


def test_pids_and_stragglers_and_cpu():
    items = feedback(CallStats(pids_events_max=7, pids_peak=32, stragglers=2, stragglers_action="killed",
                               cpu_nr_throttled=3, cpu_throttled_usec=45000),
                     Limits(pids_max=32, cpu_max_pct=50))
    kinds = {i.kind: i for i in items}
    assert "7 fork/clone calls failed" in kinds["pids_max"].message and "32" in kinds["pids_max"].message
    assert "2 processes" in kinds["stragglers_killed"].message
    assert "45 ms" in kinds["cpu_throttled"].message
    kept = feedback(CallStats(stragglers=1, stragglers_action="kept"), Limits())
    assert kept[0].kind == "stragglers_kept"


def test_over_duration():
    items = feedback(CallStats(wall_ns=10 * 10**9), Limits(), duration_ns=2 * 10**9)
    assert items[0].kind == "over_duration" and "10.0 s" in items[0].message
