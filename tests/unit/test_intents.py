"""Intents: parsing, validation errors, mapping to cgroup files, budgets."""
from __future__ import annotations

import pytest

from agentcg.core.intents import (BudgetError, Intent, IntentError, call_limits,
                                  session_limits)
from agentcg.core.model import Grant, Limits


def test_cli_string_and_dict_agree():
    a = Intent.from_string("memory=2G,cpu=latency,pids=256")
    b = Intent.from_dict({"memory": "2G", "cpu": "latency", "pids_max": 256})
    assert a == b
    assert a.memory_bytes == 2 << 30 and a.cpu_weight == 400 and a.cpu_class == "latency"
    assert a.pids_max == 256


def test_classes_and_units():
    i = Intent.parse({"memory": "low", "cpu": "batch", "cpu_max": "150%", "duration": "30s",
                      "gpu_memory": "6G", "network": "local", "priority": 3, "io": 50})
    assert i.memory_bytes == 256 << 20 and i.memory_class == "low"
    assert i.cpu_weight == 25 and i.cpu_max_pct == 150
    assert i.duration_ns == 30 * 10**9 and i.gpu_memory_bytes == 6 << 30
    assert i.network == "local" and i.priority == 3 and i.io_weight == 50
    assert Intent.parse("cpu_max=1.5").cpu_max_pct == 150


def test_round_trip():
    i = Intent.parse("memory=64M,memory_max=128M,cpu=300,cpu_max=50%,pids=10,duration=2s,network=none")
    assert Intent.from_dict(i.to_dict()) == i
    assert "memory=64M" in i.describe()


@pytest.mark.parametrize("text,field,value", [
    ("memory_max=12X", "memory_max", "12X"),
    ("memory=huge", "memory", "huge"),
    ("cpu=fast", "cpu", "fast"),
    ("cpu=0", "cpu", "0"),
    ("pids=-1", "pids_max", "-1"),
    ("network=internet", "network", "internet"),
    ("priority=11", "priority", "11"),
    ("color=blue", "color", "color"),
    ("duration=soon", "duration", "soon"),
])
def test_errors_name_field_and_value(text, field, value):
    with pytest.raises(IntentError) as ei:
        Intent.parse(text)
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}: {value!r}")


def test_memory_max_error_text():
    with pytest.raises(IntentError, match=r"^memory_max: '12X' is not a size"):
        Intent.parse("memory_max=12X")


def test_over_merges_declared_fields():
    base = Intent.parse("memory=normal,pids=100,cpu=batch")
    mine = Intent.parse("memory=64M")
    m = mine.over(base)
    assert m.memory_bytes == 64 << 20 and m.memory_class is None
    assert m.pids_max == 100 and m.cpu_class == "batch"


def test_call_mapping_files():
    limits, adj = call_limits(Intent.parse("memory=64M,memory_max=128M,cpu=latency,cpu_max=50%,pids=32,io=200"),
                              Limits())
    assert adj == []
    assert limits.files() == {
        "memory.high": str(64 << 20), "memory.max": str(128 << 20), "cpu.weight": "400",
        "cpu.max": "50000 100000", "pids.max": "32", "io.weight": "default 200"}


def test_call_is_clamped_to_session_budget():
    session = Limits(memory_max_bytes=1 << 30, pids_max=100, cpu_max_pct=200)
    limits, adj = call_limits(Intent.parse("memory=4G,memory_max=8G,pids=1000,cpu_max=400%"), session)
    assert limits.memory_max_bytes == 1 << 30
    assert limits.memory_high_bytes is None          # high above max: max is the only limit
    assert limits.pids_max == 100 and limits.cpu_max_pct == 200
    fields = {a.field: (a.requested, a.granted) for a in adj}
    assert fields["memory_max"] == (8 << 30, 1 << 30)
    assert fields["pids_max"] == (1000, 100)
    assert fields["cpu_max"] == (400, 200)
    # undeclared call limits inherit the session's caps explicitly
    limits2, _ = call_limits(Intent(), session)
    assert limits2.memory_max_bytes == 1 << 30 and limits2.pids_max == 100


def test_session_rejected_over_grant():
    grant = Grant(memory_max_bytes=2 << 30, pids_max=500, max_priority=5)
    with pytest.raises(BudgetError, match="memory_max"):
        session_limits(Intent.parse("memory_max=4G"), grant, 1000)
    with pytest.raises(BudgetError, match="priority: 9 is more than uid 1000"):
        session_limits(Intent.parse("priority=9"), grant, 1000)
    with pytest.raises(BudgetError, match="pids_max"):
        session_limits(Intent.parse("pids=501"), grant, 1000)


def test_session_gets_grant_caps_and_priority_scales_weights():
    grant = Grant(memory_max_bytes=2 << 30, pids_max=500, max_priority=10)
    lim = session_limits(Intent.parse("memory=1G,priority=10"), grant, 0)
    assert lim.memory_max_bytes == 2 << 30 and lim.pids_max == 500
    assert lim.memory_low_bytes == 1 << 30
    assert lim.cpu_weight == 200 and lim.io_weight == 200
    low = session_limits(Intent.parse("priority=1,cpu=100"), grant, 0)
    assert low.cpu_weight == 20
