"""GPU budget planner: admit, shrink-then-admit, queue/refuse, grow back, over-use."""
from __future__ import annotations

import pytest

from agentcg.core.config import ConfigError
from agentcg.core.gpu_budget import (
    Admit, BudgetInput, GpuConfig, GpuDevice, GpuProcess, GpuSnapshot, Grow, Kill, OverUse, PendingCall,
    Queue, Refuse, RunningCall, Shrink, Undeclared, WorkerPool, attribute, loans_after, plan,
)

GiB = 1 << 30
MiB = 1 << 20
NO_HEADROOM = GpuConfig(headroom_bytes=0)


def snap(free_gib: float, total_gib: int = 80, index: int = 0) -> GpuSnapshot:
    free = int(free_gib * GiB)
    return GpuSnapshot(devices=(GpuDevice(index, total_gib * GiB, total_gib * GiB - free, free),))


def pool(pool_gib: int = 40, reclaim_gib: float = 10, chunk: int = GiB) -> WorkerPool:
    return WorkerPool(0, pool_gib * GiB, int(reclaim_gib * GiB), chunk)


def test_call_that_fits_is_admitted_and_free_memory_is_handed_out_once():
    inp = BudgetInput(snap(10), pending=(PendingCall("c1", "s1", 6 * GiB), PendingCall("c2", "s1", 6 * GiB)))
    out = plan(inp, NO_HEADROOM)
    assert isinstance(out[0], Admit) and out[0].nbytes == 6 * GiB
    assert out[0].reason == "gpu_memory=6G fits: device 0 free 10G = 10G -> 4G"
    # the second one does not fit in the 4G left and there is no pool to shrink
    assert isinstance(out[1], Queue) and "no KV pool" in out[1].reason


def test_headroom_and_running_reservations_count_against_free():
    running = (RunningCall("r1", "s0", declared_bytes=8 * GiB, observed_bytes=2 * GiB),)
    inp = BudgetInput(snap(12), pending=(PendingCall("c1", "s1", 5 * GiB),), running=running)
    out = plan(inp, GpuConfig(headroom_bytes=512 * MiB))
    # 12G free - 6G still to come for r1 - 512M headroom = 5.5G: 5G fits
    assert isinstance(out[0], Admit), out
    out = plan(BudgetInput(snap(12), pending=(PendingCall("c1", "s1", 6 * GiB),), running=running),
               GpuConfig(headroom_bytes=512 * MiB))
    assert isinstance(out[0], Queue)


def test_shrink_asks_only_the_missing_part_rounded_to_chunks_then_admits():
    inp = BudgetInput(snap(2), pool=pool(reclaim_gib=10), pending=(PendingCall("c1", "s1", 5 * GiB + 1),))
    (d,) = plan(inp, NO_HEADROOM)
    assert isinstance(d, Shrink) and d.nbytes == 4 * GiB       # 3G + 1 byte missing -> 4 whole chunks
    assert "KV pool 40G -> 36G" in d.reason
    loans = loans_after({}, [d])
    assert loans == {"c1": 4 * GiB}
    # the worker shrank but NVML does not show it yet: wait, do not shrink again
    (d2,) = plan(BudgetInput(snap(2), pool=pool(36, 6), pending=inp.pending, loans=loans), NO_HEADROOM)
    assert isinstance(d2, Queue) and "waiting" in d2.reason
    # it shows: admit
    (d3,) = plan(BudgetInput(snap(6), pool=pool(36, 6), pending=inp.pending, loans=loans), NO_HEADROOM)
    assert isinstance(d3, Admit)
    # the call ends: the pool takes its 4G back
    (g,) = plan(BudgetInput(snap(1), pool=pool(36, 6), ended=("c1",), loans=loans), NO_HEADROOM)
    assert isinstance(g, Grow) and g.nbytes == 4 * GiB and "36G -> 40G" in g.reason
    assert loans_after(loans, [g]) == {}


def test_never_shrinks_more_than_reclaimable_and_says_why_it_cannot():
    inp = BudgetInput(snap(2), pool=pool(reclaim_gib=3), pending=(PendingCall("c1", "s1", 6 * GiB),))
    (d,) = plan(inp, NO_HEADROOM)
    assert isinstance(d, Queue)
    assert "give back only 3G of the 4G missing" in d.reason
    (d,) = plan(inp, GpuConfig(headroom_bytes=0, on_no_room="refuse"))
    assert isinstance(d, Refuse) and "refused" in d.reason


def test_two_shrinks_in_one_plan_share_the_reclaimable_bytes():
    pend = (PendingCall("c1", "s1", 4 * GiB), PendingCall("c2", "s2", 4 * GiB))
    out = plan(BudgetInput(snap(0), pool=pool(reclaim_gib=6), pending=pend), NO_HEADROOM)
    assert isinstance(out[0], Shrink) and out[0].nbytes == 4 * GiB
    assert isinstance(out[1], Queue) and "only 2G" in out[1].reason
    assert "40G -> 36G" in out[0].reason


def test_call_larger_than_the_device_is_refused_even_when_queueing():
    (d,) = plan(BudgetInput(snap(80, total_gib=80), pending=(PendingCall("c1", "s1", 81 * GiB),)), NO_HEADROOM)
    assert isinstance(d, Refuse) and "can never fit" in d.reason


def test_unknown_device_is_refused():
    (d,) = plan(BudgetInput(snap(10), pending=(PendingCall("c1", "s1", GiB, device_index=3),)), NO_HEADROOM)
    assert isinstance(d, Refuse) and "device 3 does not exist" in d.reason


def test_refused_call_with_a_loan_gives_it_back():
    inp = BudgetInput(snap(0), pool=pool(reclaim_gib=0), pending=(PendingCall("c1", "s1", 90 * GiB),),
                      loans={"c1": 2 * GiB})
    out = plan(inp, NO_HEADROOM)
    assert [type(d) for d in out] == [Refuse, Grow] and out[1].nbytes == 2 * GiB


def test_picks_the_device_with_room_when_none_is_named():
    gpus = GpuSnapshot(devices=(GpuDevice(0, 80 * GiB, 78 * GiB, 2 * GiB), GpuDevice(1, 80 * GiB, 70 * GiB, 10 * GiB)))
    (d,) = plan(BudgetInput(gpus, pending=(PendingCall("c1", "s1", 8 * GiB),)), NO_HEADROOM)
    assert isinstance(d, Admit) and d.device_index == 1


def test_no_gpu_admits_with_the_reason():
    inp = BudgetInput(GpuSnapshot(absent_reason="NVML: Driver Not Loaded"), pending=(PendingCall("c1", "s", GiB),))
    (d,) = plan(inp)
    assert isinstance(d, Admit) and "Driver Not Loaded" in d.reason and "unchecked" in d.reason


def test_overuse_is_reported_with_numbers_and_killed_only_when_enforced():
    rc = (RunningCall("c1", "s1", declared_bytes=2 * GiB, observed_bytes=3 * GiB),)
    out = plan(BudgetInput(snap(10), running=rc), NO_HEADROOM)
    assert [type(d) for d in out] == [OverUse]
    o = out[0]
    assert (o.declared_bytes, o.observed_bytes) == (2 * GiB, 3 * GiB)
    assert "1G more than its gpu_memory=2G" in o.reason and o.suggestion == "declare gpu_memory=3.8G"
    out = plan(BudgetInput(snap(10), running=rc), GpuConfig(headroom_bytes=0, enforce="kill"))
    assert [type(d) for d in out] == [OverUse, Kill]


def test_within_tolerance_is_not_overuse():
    rc = (RunningCall("c1", "s1", declared_bytes=10 * GiB, observed_bytes=11 * GiB),)
    assert plan(BudgetInput(snap(10), running=rc), NO_HEADROOM) == []
    assert isinstance(plan(BudgetInput(snap(10), running=rc), GpuConfig(overuse_tolerance_pct=5))[0], OverUse)


def test_undeclared_gpu_use_is_accounted():
    rc = (RunningCall("c1", "s1", declared_bytes=None, observed_bytes=700 * MiB),
          RunningCall("c2", "s1", declared_bytes=None, observed_bytes=0))
    (d,) = plan(BudgetInput(snap(10), running=rc), NO_HEADROOM)
    assert isinstance(d, Undeclared) and d.call_id == "c1" and d.observed_bytes == 700 * MiB
    assert "without a gpu_memory intent" in d.reason


def test_attribute_by_deepest_cgroup_worker_and_unreported():
    procs = (GpuProcess(10, 0, 3 * GiB, cgroup="/agentcg/s1/c-1"),
             GpuProcess(11, 0, 1 * GiB, cgroup="/agentcg/s1/c-1/sub"),
             GpuProcess(12, 0, 2 * GiB, cgroup="/agentcg/s1/agent"),
             GpuProcess(13, 0, 5 * GiB, cgroup="/system.slice/worker.service"),
             GpuProcess(14, 0, 7 * GiB, cgroup="/user.slice"),
             GpuProcess(15, 0, None, cgroup="/agentcg/s1/c-1"))
    owners = {"/agentcg/s1": ("session", "s1"), "/agentcg/s1/c-1": ("call", "c-1")}
    u = attribute(procs, owners, worker_pids=[13])
    assert u.by_call_bytes == {"c-1": 4 * GiB}
    assert u.by_session_bytes == {"s1": 2 * GiB}
    assert (u.worker_bytes, u.other_bytes, u.unreported_pids) == (5 * GiB, 7 * GiB, (15,))


def test_config_table_parses_and_names_bad_keys():
    cfg = GpuConfig.from_mapping({"enforce": "kill", "headroom": "1G", "on_no_room": "refuse"})
    assert (cfg.enforce, cfg.headroom_bytes, cfg.on_no_room) == ("kill", GiB, "refuse")
    with pytest.raises(ConfigError, match="gpu.enforce"):
        GpuConfig.from_mapping({"enforce": "zap"})
    with pytest.raises(ConfigError, match="gpu.headroom"):
        GpuConfig.from_mapping({"headroom": "lots"})
    with pytest.raises(ConfigError, match="gpu.bogus"):
        GpuConfig.from_mapping({"bogus": 1})


def test_decisions_serialise_with_their_kind():
    (d,) = plan(BudgetInput(snap(10), pending=(PendingCall("c1", "s1", GiB),)), NO_HEADROOM)
    assert d.to_dict()["kind"] == "admit" and d.to_dict()["nbytes"] == GiB


def test_shrink_also_makes_up_room_below_zero():
    # 1G free but 2G headroom: room is -1G, so a 2G call needs 3G from the pool
    inp = BudgetInput(snap(1), pool=pool(reclaim_gib=10), pending=(PendingCall("c1", "s1", 2 * GiB),))
    (d,) = plan(inp, GpuConfig(headroom_bytes=2 * GiB))
    assert isinstance(d, Shrink) and d.nbytes == 3 * GiB
