"""The typed ladder protocol (base.LadderStep / LastResort) as the planner
drives it: steps ordered by `step`, each taken once the one below has been
in force for its escalate_after_ns (measured in the snapshot's now_ns),
undone from the top after calm_hold_ns, a False undo holding the ladder.

The steps here are small rules of their own, registered under probe names,
so that these tests see the planner's handling of any LadderStep, not the
behaviour of throttle/reclaim/freeze/kill (test_policy_rules.py has those)."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy import (
    CallView, CgroupView, HostView, PolicyState, Reason, SessionView, Snapshot, TriggerEvent,
    load_ruleset, plan,
)
from agentcg.core.policy.base import LadderStep, LastResort
from agentcg.core.policy.context import Ctx
from agentcg.core.policy.registry import register

M = 1 << 20
MS = 1_000_000
T0 = 10**12


def _mark(ctx: Ctx, step: int, weight: int, why: str) -> None:
    """Step n writes cpu.weight of s-lo/c-n: the actions show which steps acted."""
    for _s, c in ctx.snap.calls():
        if c.call == f"c-{step}":
            ctx.set(c.cg, "cpu.weight", weight, Reason(why, "probe", op="", threshold=""), "lo")


@register("probe_step_one")
@dataclass(frozen=True)
class ProbeOne(LadderStep):
    step = 1

    def apply(self, ctx: Ctx) -> None:
        _mark(ctx, 1, 10, self.rule_name)

    def undo(self, ctx: Ctx) -> bool:
        _mark(ctx, 1, 1, self.rule_name)
        return True


@register("probe_step_two")
@dataclass(frozen=True)
class ProbeTwo(LadderStep):
    """Its undo holds the ladder while host usage is above hold_above_bytes."""

    step = 2
    escalate_after_ns: int = 50 * MS
    hold_above_bytes: int = 1 << 60

    def apply(self, ctx: Ctx) -> None:
        _mark(ctx, 2, 20, self.rule_name)

    def undo(self, ctx: Ctx) -> bool:
        if ctx.snap.host.usage_bytes > self.hold_above_bytes:
            return False
        _mark(ctx, 2, 1, self.rule_name)
        return True


@register("probe_last_resort")
@dataclass(frozen=True)
class ProbeLast(LastResort):
    """Acts every time it is asked to; its guard fires at guard_bytes of host usage."""

    step = 3
    escalate_after_ns: int = 100 * MS
    guard_bytes: int = 1 << 60

    def guard(self, ctx: Ctx) -> bool:
        return ctx.snap.host.usage_bytes >= self.guard_bytes

    def apply(self, ctx: Ctx, guard: bool = False) -> bool:
        _mark(ctx, 3, 40 if guard else 30, self.rule_name)
        return True

    def undo(self, ctx: Ctx) -> bool:
        _mark(ctx, 3, 1, self.rule_name)
        return True


def _rules(*extra: dict, order=("probe_last_resort", "probe_step_one", "probe_step_two")):
    entries = [{"name": "psi_pressure", "args": {"stall_threshold_us": 10_000}}]
    entries += [{"name": n} for n in order] + list(extra)
    return load_ruleset({"rules": entries, "ladder": {"calm_hold_ns": "300ms"}})


def _world(now_ns: int, state: PolicyState, pressure: bool, usage_bytes: int = 100 * M) -> Snapshot:
    """hi (priority 9) stalls on memory when `pressure`; lo (priority 1) has calls c-1..c-3."""
    trig = (TriggerEvent("some", 50_000, 500_000),) if pressure else ()
    hi = SessionView("hi", CgroupView("s-hi", 10 * M, triggers=trig), 9)
    calls = tuple(CallView("lo", f"c-{n}", CgroupView(f"s-lo/c-{n}", M)) for n in (1, 2, 3))
    lo = SessionView("lo", CgroupView("s-lo", 3 * M), 1, calls=calls)
    return Snapshot(now_ns, HostView(CgroupView("", usage_bytes), None), (hi, lo), state)


def _acted(decision) -> list[tuple[str, int]]:
    return [(a.target, a.new) for a in decision.actions]


def test_steps_are_ordered_by_step_not_by_config_order():
    rs = _rules()
    assert [r.rule_name for r in rs.ladder_steps()] == ["probe_step_one", "probe_step_two", "probe_last_resort"]
    d = plan(_world(T0, PolicyState(), pressure=True), rs)
    assert d.state.level == 1
    assert _acted(d) == [("s-lo/c-1", 10)]


def test_each_step_waits_its_escalate_after_ns_in_snapshot_time():
    rs = _rules()
    d1 = plan(_world(T0, PolicyState(), True), rs)
    d2 = plan(_world(T0 + 49 * MS, d1.state, True), rs)
    assert d2.state.level == 1 and d2.wake_in_ns == 1 * MS  # step two is due in 1 ms
    d3 = plan(_world(T0 + 50 * MS, d2.state, True), rs)
    assert d3.state.level == 2
    assert _acted(d3) == [("s-lo/c-1", 10), ("s-lo/c-2", 20)]  # steps reached stay in force
    d4 = plan(_world(T0 + 149 * MS, d3.state, True), rs)
    assert d4.state.level == 2 and ("s-lo/c-3", 30) not in _acted(d4)
    d5 = plan(_world(T0 + 150 * MS, d4.state, True), rs)
    assert d5.state.level == 3 and ("s-lo/c-3", 30) in _acted(d5)


def test_the_last_resort_acts_once_per_escalate_after_ns():
    rs = _rules()
    st = PolicyState(level=3, level_since_ns=T0, pressure_since_ns=T0)
    d1 = plan(_world(T0 + 10 * MS, st, True), rs)
    assert ("s-lo/c-3", 30) not in _acted(d1) and d1.wake_in_ns == 90 * MS
    d2 = plan(_world(T0 + 100 * MS, d1.state, True), rs)
    assert ("s-lo/c-3", 30) in _acted(d2) and d2.state.level_since_ns == T0 + 100 * MS


def test_the_last_resort_guard_acts_without_pressure_at_level_zero():
    rs = _rules({"name": "probe_last_resort", "args": {"guard_bytes": "1G"}}, order=("probe_step_one",))
    calm = plan(_world(T0, PolicyState(), False, usage_bytes=512 * M), rs)
    assert _acted(calm) == []
    full = plan(_world(T0, PolicyState(), False, usage_bytes=1 << 30), rs)
    assert full.state.level == 0 and _acted(full) == [("s-lo/c-3", 40)]


def test_undo_runs_from_the_top_after_calm_hold():
    rs = _rules()
    st = PolicyState(level=3, level_since_ns=T0, pressure_since_ns=T0)
    d1 = plan(_world(T0 + 1 * MS, st, False), rs)
    assert d1.state.level == 3 and _acted(d1) == [] and d1.wake_in_ns == 300 * MS
    d2 = plan(_world(T0 + 301 * MS, d1.state, False), rs)
    assert _acted(d2) == [("s-lo/c-3", 1), ("s-lo/c-2", 1), ("s-lo/c-1", 1)]
    assert d2.state.level == 0 and d2.state.pressure_since_ns is None


def test_a_false_undo_holds_the_ladder_until_it_succeeds():
    rs = _rules({"name": "probe_step_two", "args": {"hold_above_bytes": "200M"}},
                order=("probe_step_one", "probe_last_resort"))
    st = PolicyState(level=2, level_since_ns=T0, pressure_since_ns=T0, calm_since_ns=T0)
    held = plan(_world(T0 + 400 * MS, st, False, usage_bytes=300 * M), rs)
    assert held.state.level == 2 and held.wake_in_ns == 300 * MS
    assert ("s-lo/c-2", 1) not in _acted(held)
    done = plan(_world(T0 + 500 * MS, held.state, False, usage_bytes=150 * M), rs)
    assert done.state.level == 0 and ("s-lo/c-2", 1) in _acted(done)
