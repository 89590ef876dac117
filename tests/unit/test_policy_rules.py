"""Policy core: each rule and the memory ladder, snapshots in, actions out."""
from __future__ import annotations

import pytest

from agentcg.core.policy import (
    CallView, CgroupView, HostView, MemEvents, PolicyConfigError, PolicyState, Psi, Reason, SessionView,
    Snapshot, TriggerEvent, decide, load_ruleset, plan,
)
from agentcg.core.policy.model import Action

M = 1 << 20
G = 1 << 30
MS = 1_000_000


def cg(path, cur=0, high=None, mx=None, low=0, frozen=False, ev=None, psi=None, trig=()):
    return CgroupView(path, cur, high, mx, low, psi or Psi(), tuple(trig), ev or MemEvents(), frozen)


def call(sess, n, cur=0, high=None, mx=None, started=0, **kw):
    return CallView(sess, f"c-{n}", cg(f"s-{sess}/c-{n}", cur, high, mx, **{k: v for k, v in kw.items()
                                                                          if k in ("ev", "frozen")}),
                    started_ns=started, **{k: v for k, v in kw.items() if k not in ("ev", "frozen")})


def session(name, prio, calls=(), agent_bytes=100 * M, mx=None, psi=None, trig=()):
    used = agent_bytes + sum(c.cg.memory_current_bytes for c in calls)
    return SessionView(name, cg(f"s-{name}", used, mx=mx, psi=psi, trig=trig), prio,
                       cg(f"s-{name}/agent", agent_bytes), tuple(calls))


def snap(sessions, budget=2 * G, now=10**12, state=None, usage=None, swap=0, inactive_file=0):
    used = usage if usage is not None else sum(s.cg.memory_current_bytes for s in sessions)
    return Snapshot(now, HostView(cg("", used), budget, swap, inactive_file), tuple(sessions),
                    state or PolicyState())


BB0 = {"name": "burst_borrow", "args": {"share_pct": 0.0}}


def rules(*entries):
    return load_ruleset({"rules": [e if isinstance(e, dict) else {"name": e} for e in entries]})


# ---------------------------------------------------------------- rendering and config

def test_action_renders_old_new_target_and_reason():
    a = Action("set", "s-42/c-17", "memory.high", 2 * G, int(1.2 * G),
               Reason("pressure", "38ms/500ms", "10ms"))
    assert a.render() == "memory.high 2G -> 1.2G on s-42/c-17 (pressure: 38ms/500ms > 10ms)"
    assert Action("thaw", "s-1/c-2", "cgroup.freeze", 1, 0, Reason("freeze", "calm", op="", threshold="")) \
        .render() == "cgroup.freeze 1 -> 0 on s-1/c-2 (freeze: calm)"


def test_config_parses_units_and_names_bad_fields():
    rs = load_ruleset({"rules": [{"name": "burst_borrow", "args": {"default_call_bytes": "32M"}},
                                 {"name": "kill", "args": {"escalate_after_ns": "1.5s"}}],
                       "ladder": {"calm_hold_ns": "100ms"}})
    assert rs.rules[0].default_call_bytes == 32 * M
    assert rs.rules[1].escalate_after_ns == 1_500_000_000
    assert rs.ladder.calm_hold_ns == 100 * MS
    with pytest.raises(PolicyConfigError, match=r"policy.rules\[0\].args.step_pct"):
        load_ruleset({"rules": [{"name": "burst_borrow", "args": {"step_pct": 150}}]})
    with pytest.raises(PolicyConfigError, match=r"policy.rules\[1\].name: unknown rule 'nope'"):
        load_ruleset({"rules": [{"name": "freeze"}, {"name": "nope"}]})
    with pytest.raises(PolicyConfigError, match=r"args.hold: rule 'freeze' has no argument"):
        load_ruleset({"rules": [{"name": "freeze", "args": {"hold": 1}}]})
    with pytest.raises(PolicyConfigError, match=r"default_call_bytes: not a size: 'lots'"):
        load_ruleset({"rules": [{"name": "burst_borrow", "args": {"default_call_bytes": "lots"}}]})
    with pytest.raises(PolicyConfigError, match=r"args.kind: 'some' or 'full'"):
        load_ruleset({"rules": [{"name": "psi_pressure", "args": {"kind": "most"}}]})
    with pytest.raises(PolicyConfigError, match=r"policy.ladder.calm: unknown key"):
        load_ruleset({"ladder": {"calm": 1}})
    with pytest.raises(PolicyConfigError, match=r"policy.preset: unknown preset"):
        load_ruleset({"preset": "fast"})


def test_default_preset_is_the_adaptive_ladder():
    assert load_ruleset({}).names() == ["psi_pressure", "burst_borrow", "call_cap", "cpu_classes",
                                         "boost_blocking", "throttle", "reclaim", "freeze", "kill"]


# ---------------------------------------------------------------- detectors

def test_psi_trigger_event_is_pressure_with_measured_and_threshold():
    s = session("a", 5, psi=Psi(some_total_us=0), trig=[TriggerEvent("some", 38_000, 500_000)])
    d = plan(snap([s], budget=None), rules({"name": "psi_pressure", "args": {"stall_threshold_us": 10000}}))
    assert len(d.findings) == 1
    f = d.findings[0]
    assert (f.session, f.measured, f.threshold, f.priority) == ("a", "38ms/500ms", "10ms", 5)


def test_psi_total_growth_between_ticks_is_pressure_and_quiet_is_not():
    rs = rules("psi_pressure")
    s0 = session("a", 1, psi=Psi(some_total_us=1_000_000))
    st = plan(snap([s0], now=10**12, budget=None), rs).state
    quiet = session("a", 1, psi=Psi(some_total_us=1_002_000))  # 2 ms stall in 100 ms
    assert plan(snap([quiet], now=10**12 + 100 * MS, state=st, budget=None), rs).findings == ()
    busy = session("a", 1, psi=Psi(some_total_us=1_050_000))  # 50 ms stall in 100 ms
    f = plan(snap([busy], now=10**12 + 100 * MS, state=st, budget=None), rs).findings
    assert [x.measured for x in f] == ["50ms/500ms"]


# ---------------------------------------------------------------- burst borrowing

def test_new_call_starts_at_its_intent_or_default():
    c1 = call("a", 1, cur=1 * M, intent_memory_bytes=256 * M)
    c2 = call("a", 2, cur=1 * M)
    acts = decide(snap([session("a", 1, [c1, c2])]), rules(BB0))
    highs = {a.target: a.new for a in acts if a.knob == "memory.high"}
    assert highs == {"s-a/c-1": 256 * M, "s-a/c-2": 65 * M}


def test_call_near_its_mark_borrows_while_host_has_slack():
    c = call("a", 1, cur=60 * M, high=64 * M)
    [a] = decide(snap([session("a", 1, [c])], budget=4 * G), rules(BB0))
    assert (a.knob, a.old, a.new) == ("memory.high", 64 * M, 64 * M + 64 * M)
    assert a.reason.rule == "burst_borrow" and "host free" in a.reason.detail


def test_breach_event_borrows_a_step_of_half_the_usage():
    c = call("a", 1, cur=1 * G, high=1 * G, ev=MemEvents(high=3))
    [a] = decide(snap([session("a", 1, [c])], budget=8 * G), rules(BB0))
    assert a.new == 1 * G + G // 2


def test_no_slack_means_denied_finding_and_no_raise():
    c = call("a", 1, cur=900 * M, high=900 * M, ev=MemEvents(high=1))
    d = plan(snap([session("a", 3, [c], agent_bytes=100 * M)], budget=1 * G), rules(BB0))
    assert d.actions == ()
    assert [(f.kind, f.call, f.priority) for f in d.findings] == [("denied", "s-a/c-1", 3)]


def test_high_priority_is_served_first_from_little_slack():
    lo = call("lo", 1, cur=300 * M, high=300 * M, ev=MemEvents(high=1), started=1)
    hi = call("hi", 1, cur=300 * M, high=300 * M, ev=MemEvents(high=1), started=2)
    sessions = [session("lo", 1, [lo]), session("hi", 9, [hi])]
    # 985M less 3% reserve = 955M; 800M used -> 155M free: hi takes its 150M step, lo finds 5M
    d = plan(snap(sessions, budget=985 * M), rules({"name": "burst_borrow", "args": {"step_pct": 50.0, "share_pct": 0.0}}))
    raised = [a.target for a in d.actions]
    assert raised == ["s-hi/c-1"]
    assert [f.call for f in d.findings] == ["s-lo/c-1"]


# ---------------------------------------------------------------- the ladder

LADDER = [BB0, {"name": "throttle"},
          {"name": "reclaim", "args": {"escalate_after_ns": "50ms"}},
          {"name": "freeze", "args": {"escalate_after_ns": "200ms"}},
          {"name": "kill", "args": {"escalate_after_ns": "2s"}}]


def _pressure_world(state, now, frozen_lo=False, hi_cur=400 * M, lo_cur=400 * M, swap=4 * G):
    """A host with swap (unless swap=0): lo's memory can be pushed out for hi."""
    hi = call("hi", 1, cur=hi_cur, high=hi_cur, ev=MemEvents(high=1), started=5)
    lo = call("lo", 1, cur=lo_cur, high=lo_cur + 100 * M, started=1, frozen=frozen_lo)
    sessions = [session("hi", 9, [hi]), session("lo", 1, [lo])]
    return snap(sessions, budget=1 * G, now=now, state=state, swap=swap)


def test_ladder_climbs_one_step_at_a_time_in_order():
    rs = load_ruleset({"rules": LADDER, "ladder": {"calm_hold_ns": "300ms"}})
    t0 = 10**12
    d1 = plan(_pressure_world(PolicyState(), t0), rs)
    assert d1.state.level == 1
    assert {a.kind for a in d1.actions} == {"set"}
    # hi borrows what lo holds (the host is at its reserve mark: pressure, not a denial)
    assert [(a.target, a.new) for a in d1.actions if a.target == "s-hi/c-1"] == [("s-hi/c-1", 600 * M)]
    assert [(f.kind, f.priority) for f in d1.findings] == [("pressure", 9)]
    # throttle: lo's unused borrowed headroom is taken back, nothing frozen, nothing killed
    lo_acts = [a for a in d1.actions if a.target.startswith("s-lo")]
    assert [(a.target, a.new) for a in lo_acts] == [("s-lo/c-1", 400 * M + 8 * M)]
    assert lo_acts[0].reason.detail == "borrowed headroom returned"

    d2 = plan(_pressure_world(d1.state, t0 + 20 * MS), rs)
    assert d2.state.level == 1  # reclaim waits 50 ms
    d3 = plan(_pressure_world(d2.state, t0 + 60 * MS), rs)
    assert d3.state.level == 2
    lows = [a for a in d3.actions if a.knob == "memory.low"]
    assert [(a.target, a.new) for a in lows] == [("s-hi", 500 * M)]
    assert any(a.target == "s-lo/c-1" and a.knob == "memory.high" and a.new == 360 * M for a in d3.actions)
    assert not any(a.kind in ("freeze", "kill") for a in d3.actions)

    d4 = plan(_pressure_world(d3.state, t0 + 270 * MS), rs)
    assert d4.state.level == 3
    fr = [a for a in d4.actions if a.kind == "freeze"]
    assert [a.target for a in fr] == ["s-lo/c-1"] and "paused" in fr[0].feedback
    assert not any(a.kind == "kill" for a in d4.actions)

    d5 = plan(_pressure_world(d4.state, t0 + 1 * 10**9, frozen_lo=True), rs)
    assert d5.state.level == 3 and not any(a.kind == "kill" for a in d5.actions)
    d6 = plan(_pressure_world(d5.state, t0 + 2300 * MS, frozen_lo=True), rs)
    assert d6.state.level == 4
    kills = [a for a in d6.actions if a.kind == "kill"]
    assert [a.target for a in kills] == ["s-lo/c-1"]
    assert "agent keeps running" in kills[0].feedback
    # a second kill only after another escalate_after_ns
    d7 = plan(_pressure_world(d6.state, t0 + 2400 * MS, frozen_lo=True), rs)
    assert not any(a.kind == "kill" for a in d7.actions)


def test_ladder_thaws_only_after_calm_hold_and_below_thaw_mark():
    rs = load_ruleset({"rules": LADDER, "ladder": {"calm_hold_ns": "300ms"}})
    t0 = 10**12
    st = PolicyState(level=3, level_since_ns=t0, pressure_since_ns=t0, frozen=("s-lo/c-1",),
                     frozen_since_ns=(("s-lo/c-1", t0),), protected=(("s-hi", 0),))
    lo = call("lo", 1, cur=300 * M, high=300 * M, started=1, frozen=True)
    hi_s = session("hi", 9, [])
    hi_s = SessionView("hi", cg("s-hi", hi_s.cg.memory_current_bytes, low=500 * M), 9, hi_s.agent, ())
    calm = [hi_s, session("lo", 1, [lo])]
    d1 = plan(snap(calm, budget=1 * G, now=t0 + 10 * MS, state=st), rs)
    assert d1.state.level == 3 and not any(a.kind == "thaw" for a in d1.actions)
    assert d1.wake_in_ns == 300 * MS
    d2 = plan(snap(calm, budget=1 * G, now=t0 + 320 * MS, state=d1.state), rs)
    assert [a.target for a in d2.actions if a.kind == "thaw"] == ["s-lo/c-1"]
    assert [(a.target, a.new) for a in d2.actions if a.knob == "memory.low"] == [("s-hi", 0)]
    assert d2.state.level == 0 and d2.state.frozen == ()
    # too full to thaw: the ladder holds
    full = [session("hi", 9, [], agent_bytes=700 * M), session("lo", 1, [lo])]
    d3 = plan(snap(full, budget=1 * G, now=t0 + 320 * MS, state=d1.state), rs)
    assert not any(a.kind == "thaw" for a in d3.actions) and d3.state.level == 3


def test_same_priority_pressure_never_freezes_or_kills_peers_early():
    rs = load_ruleset({"rules": LADDER})
    t0 = 10**12
    a = call("a", 1, cur=450 * M, high=450 * M, ev=MemEvents(high=1), started=1)
    b = call("b", 1, cur=400 * M, high=400 * M, ev=MemEvents(high=1), started=2)
    st = PolicyState(last_grant_ns=t0)
    for dt in (0, 100, 300, 2500, 4900):
        d = plan(snap([session("a", 1, [a], 50 * M), session("b", 1, [b], 50 * M)], budget=960 * M,
                      now=t0 + dt * MS, state=st), rs)
        st = d.state
        assert d.findings and all(f.kind == "denied" for f in d.findings)
        assert not any(x.kind in ("freeze", "kill") for x in d.actions), dt


def test_deadlock_between_peers_kills_the_youngest_waiting_call():
    rs = load_ruleset({"rules": LADDER})
    t0 = 10**12
    a = call("a", 1, cur=450 * M, high=450 * M, ev=MemEvents(high=1), started=1)
    b = call("b", 1, cur=400 * M, high=400 * M, ev=MemEvents(high=1), started=2)
    st = PolicyState(level=4, level_since_ns=t0, pressure_since_ns=t0, last_grant_ns=t0)
    d = plan(snap([session("a", 1, [a], 50 * M), session("b", 1, [b], 50 * M)], budget=960 * M,
                  now=t0 + 6 * 10**9, state=st), rs)
    assert [x.target for x in d.actions if x.kind == "kill"] == ["s-b/c-1"]


def test_oom_guard_kills_a_tool_call_never_the_agent():
    rs = load_ruleset({"rules": LADDER})
    lo = call("lo", 1, cur=200 * M, high=None)
    hi = call("hi", 1, cur=100 * M, high=None)
    sessions = [session("hi", 9, [hi], agent_bytes=600 * M), session("lo", 1, [lo], agent_bytes=120 * M)]
    acts = decide(snap(sessions, budget=1 * G, usage=1 * G), rs)
    kills = [a for a in acts if a.kind == "kill"]
    assert [a.target for a in kills] == ["s-lo/c-1"]
    assert kills[0].reason.rule == "kill" and "budget" in kills[0].reason.threshold
    assert not any(a.target.endswith("/agent") or a.target in ("s-hi", "s-lo") for a in kills)


def test_oom_guard_leaves_idle_page_cache_to_reclaim():
    """At its budget, a host whose usage is partly idle page cache kills
    nothing: the kernel drops that cache first. Once what is left is
    pinned (anonymous) memory, the guard takes a call."""
    rs = load_ruleset({"rules": LADDER})
    lo = call("lo", 1, cur=200 * M, high=None)
    hi = call("hi", 1, cur=100 * M, high=None)
    sessions = [session("hi", 9, [hi], agent_bytes=600 * M), session("lo", 1, [lo], agent_bytes=120 * M)]
    cached = decide(snap(sessions, budget=1 * G, usage=1 * G, inactive_file=64 * M), rs)
    assert not [a for a in cached if a.kind == "kill"]
    pinned = decide(snap(sessions, budget=1 * G, usage=1 * G, inactive_file=4 * M), rs)
    kills = [a for a in pinned if a.kind == "kill"]
    assert [a.target for a in kills] == ["s-lo/c-1"]
    assert "idle page cache" in kills[0].reason.detail


def test_oom_guard_counts_a_killed_call_still_exiting_as_freed():
    """The guard killed lo's call one tick ago; it still holds its 200M while
    it exits. At the same usage the next tick kills nobody else, but it does
    when what the dying call gives back is not enough."""
    rs = load_ruleset({"rules": LADDER})
    lo = call("lo", 1, cur=200 * M, high=None)
    hi = call("hi", 1, cur=100 * M, high=None)
    sessions = [session("hi", 9, [hi], agent_bytes=600 * M), session("lo", 1, [lo], agent_bytes=120 * M)]
    dying = PolicyState().with_(killed=("s-lo/c-1",))
    assert not [a for a in decide(snap(sessions, budget=1 * G, usage=1 * G, state=dying), rs) if a.kind == "kill"]
    over = decide(snap(sessions, budget=1 * G, usage=1 * G + 400 * M, state=dying), rs)
    assert [a.target for a in over if a.kind == "kill"] == ["s-hi/c-1"]


def test_kill_refuses_non_call_cgroups():
    from agentcg.core.policy.context import Ctx
    ctx = Ctx(snap([]), PolicyState())
    agent_like = CallView("a", "agent", cg("s-a/agent"))
    with pytest.raises(ValueError, match="only tool-call cgroups"):
        ctx.kill(agent_like, Reason("x", "y"), "z")


# ---------------------------------------------------------------- caps, cpu, baselines

def test_call_cap_sets_call_max_and_kills_a_call_alone_over_the_cap():
    c = call("a", 1, cur=100 * M, high=None)
    s = session("a", 1, [c], agent_bytes=200 * M, mx=1 * G)
    acts = decide(snap([s], budget=None), rules("call_cap"))
    assert [(a.target, a.knob, a.new) for a in acts] == [("s-a/c-1", "memory.max", 1 * G - 200 * M - 16 * M)]
    big = call("a", 1, cur=800 * M, mx=808 * M, ev=MemEvents(max=2))
    s2 = session("a", 1, [big], agent_bytes=200 * M, mx=1 * G)
    acts = decide(snap([s2], budget=None), rules("call_cap"))
    assert [(a.kind, a.target) for a in acts] == [("kill", "s-a/c-1")]
    assert "exceeds the 1G memory cap of session a" in acts[0].feedback


def test_call_cap_never_loosens_a_calls_own_declared_memory_max():
    # The call declared memory_max=64M inside a 1G session: the session-derived
    # mark (1G - agent - margin) must not replace it, and the rule leaves the
    # kill to the kernel at the call's own cap.
    c = CallView("a", "c-1", cg("s-a/c-1", cur=60 * M, mx=64 * M), intent_memory_max_bytes=64 * M)
    s = session("a", 1, [c], agent_bytes=200 * M, mx=1 * G)
    assert decide(snap([s], budget=None), rules("call_cap")) == []
    loose = CallView("a", "c-1", cg("s-a/c-1", cur=60 * M, mx=1 * G), intent_memory_max_bytes=64 * M)
    acts = decide(snap([session("a", 1, [loose], agent_bytes=200 * M, mx=1 * G)], budget=None), rules("call_cap"))
    assert [(a.kind, a.knob, a.new) for a in acts] == [("set", "memory.max", 64 * M)]


def test_memory_values_are_planned_in_whole_pages_and_not_rewritten():
    """budget/N is rarely a page multiple; the kernel keeps whole pages, so
    the plan does too and, once written, the value reads back as set."""
    rs = rules({"name": "static_session_max", "args": {"sessions": 3}})
    sessions = [session("a", 5), session("b", 5), session("c", 5)]
    budget = 1000 * M + 1   # / 3 is not a page multiple
    first = decide(snap(sessions, budget=budget), rs)
    vals = {a.new for a in first if a.knob == "memory.max"}
    assert len(vals) == 1 and next(iter(vals)) % 4096 == 0 and 0 <= budget // 3 - next(iter(vals)) < 4096
    mx = next(iter(vals))
    again = [session(n, 5, mx=mx) for n in ("a", "b", "c")]
    assert [a for a in decide(snap(again, budget=budget), rs) if a.knob == "memory.max"] == []


def test_cpu_classes_and_blocking_boost():
    lat = CallView("a", "c-1", cg("s-a/c-1"), cpu_class="latency", blocking=False)
    bat = CallView("a", "c-2", cg("s-a/c-2"), cpu_class="batch", blocking=True)
    blk = CallView("a", "c-3", cg("s-a/c-3"), blocking=True)
    s = SessionView("a", cg("s-a"), 1, None, (lat, bat, blk))
    acts = decide(snap([s]), rules({"name": "cpu_classes", "args": {"batch_max_pct": 50}}, "boost_blocking"))
    got = {(a.target, a.knob): a.new for a in acts}
    assert got == {("s-a/c-1", "cpu.weight"): 200, ("s-a/c-2", "cpu.weight"): 25,
                   ("s-a/c-2", "cpu.max"): "50000 100000", ("s-a/c-3", "cpu.weight"): 400}


def test_static_session_max_splits_the_budget():
    acts = decide(snap([session("a", 1), session("b", 2)], budget=2 * G), rules("static_session_max"))
    assert {(a.target, a.new) for a in acts} == {("s-a", 1 * G), ("s-b", 1 * G)}


def test_command_hint_gives_big_mark_to_test_runners_only():
    t = CallView("a", "c-1", cg("s-a/c-1"), cmd="cd repo && python -m pytest tests/ -x")
    g = CallView("a", "c-2", cg("s-a/c-2"), cmd="git status")
    acts = decide(snap([SessionView("a", cg("s-a"), 1, None, (t, g))]), rules("command_hint_high"))
    assert {(a.target, a.new) for a in acts} == {("s-a/c-1", 1 * G), ("s-a/c-2", 128 * M)}
    # set once: a call that already has a mark is left alone
    t2 = CallView("a", "c-1", cg("s-a/c-1", high=1 * G), cmd="pytest")
    assert decide(snap([SessionView("a", cg("s-a"), 1, None, (t2,))]), rules("command_hint_high")) == []


def test_no_action_when_value_already_set():
    c = call("a", 1, cur=1 * M, high=65 * M)
    assert decide(snap([session("a", 1, [c])]), rules(BB0)) == []


def test_crowded_host_keeps_the_rest_for_the_higher_priority_and_reports_pressure():
    lo = call("lo", 1, cur=400 * M, high=400 * M, ev=MemEvents(high=1), started=1)
    hi = call("hi", 1, cur=300 * M, high=300 * M, ev=MemEvents(high=1), started=2)
    sessions = [session("lo", 1, [lo], 50 * M), session("hi", 9, [hi], 50 * M)]  # 800M of 900M: > 85%
    d = plan(snap(sessions, budget=900 * M), rules(BB0))
    assert [a.target for a in d.actions] == ["s-hi/c-1"]
    kinds = sorted((f.kind, f.priority) for f in d.findings)
    # hi's step (150M) is more than the free budget (73M): it borrows from lo, which the
    # ladder is told about; lo cannot borrow what is promised to hi
    assert kinds == [("borrow", 9), ("denied", 1)]


def test_without_a_host_budget_calls_run_unmarked():
    c = call("a", 1, cur=10 * M)
    assert decide(snap([session("a", 1, [c])], budget=None), rules(BB0)) == []


def test_slack_share_makes_large_steps_while_the_host_is_empty():
    c = call("a", 1, cur=60 * M, high=64 * M)
    [a] = decide(snap([session("a", 1, [c])], budget=4 * G),
                 rules({"name": "burst_borrow", "args": {"share_pct": 50.0}}))
    # free = 4G less 3% reserve less 160M used less 4M unused headroom; half of it to the one call
    free = int(4 * G * 0.97) - 160 * M - 4 * M
    want = 64 * M + free // 2
    assert a.new == want - want % 4096   # in whole pages, as the kernel keeps it


def test_psi_stall_while_the_host_has_room_is_not_pressure():
    s = session("a", 5, trig=[TriggerEvent("some", 38_000, 500_000)])
    assert plan(snap([s], budget=8 * G), rules("psi_pressure")).findings == ()
    assert len(plan(snap([s], budget=8 * G, usage=7 * G), rules("psi_pressure")).findings) == 1


# ---------------------------------------------------------------- priorities borrow from lower ones

def _crowded_world(state=None, now=10**12, lo_frozen=False, hi_high=64 * M, hi_cur=60 * M, lo_high=800 * M,
                   swap=4 * G):
    """2G budget, host at ~93%: hi's call is near its mark, lo (priority 1) holds ~40% of the
    budget, 720M of it in a tool call (with unused headroom above it). With swap unless swap=0."""
    hi = call("hi", 1, cur=hi_cur, high=hi_high, started=5)
    lo = call("lo", 1, cur=720 * M, high=lo_high, started=1, frozen=lo_frozen)
    sessions = [session("hi", 8, [hi], agent_bytes=1025 * M + 60 * M - hi_cur), session("lo", 1, [lo])]
    return snap(sessions, budget=2 * G, now=now, state=state, swap=swap)


def test_high_call_borrows_what_lower_priorities_hold_on_a_crowded_host():
    s = _crowded_world()
    assert s.host.usage_bytes / s.host.budget_bytes > 0.92
    d = plan(s, rules("burst_borrow"))
    hi = [a for a in d.actions if a.target == "s-hi/c-1"]
    assert len(hi) == 1 and hi[0].knob == "memory.high" and hi[0].new > 64 * M + 128 * M, d.actions
    assert "available to priority 8" in hi[0].reason.detail
    # the free budget cannot back that step: the ladder is told, at hi's priority, that lo must give
    # (lo, near its own mark, cannot borrow what is now promised to hi)
    assert sorted((f.kind, f.priority, f.call) for f in d.findings) == [("borrow", 8, "s-hi/c-1"),
                                                                         ("denied", 1, "s-lo/c-1")]
    assert not any(a.target.startswith("s-lo") and a.new is not None and a.new > 800 * M for a in d.actions)


def test_lower_priority_cannot_borrow_what_is_promised_to_a_higher_one():
    # hi holds a 300M promise it has not used; lo asks for more on a host with 93M free
    hi = call("hi", 1, cur=100 * M, high=400 * M, started=5)
    lo = call("lo", 1, cur=300 * M, high=300 * M, ev=MemEvents(high=1), started=1)
    d = plan(snap([session("hi", 8, [hi], agent_bytes=250 * M), session("lo", 1, [lo], agent_bytes=250 * M)],
                  budget=1 * G), rules("burst_borrow"))
    assert d.actions == ()
    assert [(f.kind, f.call) for f in d.findings] == [("denied", "s-lo/c-1")]


def test_reclaimable_memory_stops_at_the_lower_sessions_protected_floor():
    from agentcg.core.policy.context import Ctx
    from agentcg.core.policy.grants import _reclaimable
    lo_call = call("lo", 1, cur=500 * M, high=500 * M)
    plain = session("lo", 1, [lo_call], agent_bytes=100 * M)
    ctx = Ctx(snap([plain]), PolicyState())
    assert _reclaimable(ctx, plain) == 500 * M  # the agent's own 100M is never counted
    guarded = SessionView("lo", cg("s-lo", 600 * M, low=400 * M), 1, cg("s-lo/agent", 100 * M), (lo_call,))
    assert _reclaimable(ctx, guarded) == 200 * M  # memory.low 400M protects the rest
    declared = CallView("lo", "c-1", cg("s-lo/c-1", 500 * M, 500 * M), intent_memory_bytes=450 * M)
    assert _reclaimable(ctx, SessionView("lo", cg("s-lo", 600 * M), 1, cg("s-lo/agent", 100 * M),
                                         (declared,))) == 50 * M


def test_highest_priority_new_call_starts_at_its_intent_on_a_full_host():
    # 800M of 1G used, another hi call holds a 200M promise: the accounting has nothing left,
    # the budget physically has 224M: the new hi call still starts at its 64M default
    a = call("hi", 1, cur=100 * M, high=300 * M, started=1)
    b = call("hi", 2, cur=1 * M, started=2)
    lo_s = session("lo", 1, [], agent_bytes=599 * M)
    d = plan(snap([session("hi", 8, [a, b]), lo_s], budget=1 * G), rules("burst_borrow"))
    assert [(x.target, x.new) for x in d.actions] == [("s-hi/c-2", 64 * M)]
    # a lower priority's new call in the same world gets no more than the budget backs
    c = call("lo", 1, cur=1 * M, started=3)
    lo2 = session("lo", 1, [c], agent_bytes=598 * M)
    d2 = plan(snap([session("hi", 8, [a]), lo2], budget=1 * G), rules("burst_borrow"))
    assert [(x.target, x.new) for x in d2.actions] == [("s-lo/c-1", 1 * M)]


def test_sustained_borrowing_throttles_reclaims_freezes_the_lower_priority_never_the_higher():
    rs = load_ruleset({"rules": [{"name": "burst_borrow"}, {"name": "throttle"},
                                 {"name": "reclaim", "args": {"escalate_after_ns": "20ms"}},
                                 {"name": "freeze", "args": {"escalate_after_ns": "50ms"}},
                                 {"name": "kill", "args": {"escalate_after_ns": "2s"}}],
                       "ladder": {"calm_hold_ns": "300ms"}})
    t0 = 10**12
    st = PolicyState()
    hi_high, lo_frozen = 64 * M, False
    seen: list = []
    lo_high = 800 * M
    for dt_ms in (0, 10, 30, 60, 100, 1000, 2500, 4000):
        s = _crowded_world(st, t0 + dt_ms * MS, lo_frozen=lo_frozen, hi_high=hi_high, hi_cur=hi_high - 4 * M,
                           lo_high=lo_high)
        d = plan(s, rs)
        st = d.state
        seen += list(d.actions)
        for a in d.actions:
            if a.target == "s-hi/c-1" and a.knob == "memory.high":
                assert a.new > a.old, a.render()  # hi is only ever raised
                hi_high = min(a.new, 120 * M)     # it keeps asking: the next tick finds it near its mark again
            if a.target == "s-lo/c-1" and a.knob == "memory.high":
                lo_high = a.new
            if a.target == "s-lo/c-1" and a.kind == "freeze":
                lo_frozen = True
        assert all(a.reason.rule for a in d.actions)
    on_lo = [(a.kind, a.knob) for a in seen if a.target == "s-lo/c-1"]
    assert ("set", "memory.high") in on_lo and ("freeze", "cgroup.freeze") in on_lo
    lows = [a.new for a in seen if a.target == "s-lo/c-1" and a.knob == "memory.high"]
    assert lows[0] == 720 * M + 8 * M and lows[-1] == 648 * M  # throttle, then reclaim 10%
    assert [a.new for a in seen if a.target == "s-hi" and a.knob == "memory.low"]  # hi protected
    assert not any(a.target.startswith("s-hi") and a.kind in ("freeze", "kill") for a in seen)
    # the host stayed below its reserve mark and hi got what it asked: no kill
    assert not any(a.kind == "kill" for a in seen) and st.level >= 3


def test_frozen_calls_thaw_when_agents_keep_the_host_above_the_thaw_mark():
    # agents at rest hold 93% of the budget; the pressure is gone; nothing higher asks
    rs = load_ruleset({"rules": LADDER, "ladder": {"calm_hold_ns": "300ms"}})
    t0 = 10**12
    st = PolicyState(level=3, level_since_ns=t0, pressure_since_ns=t0, frozen=("s-lo/c-1",),
                     frozen_since_ns=(("s-lo/c-1", t0),))
    lo = call("lo", 1, cur=100 * M, high=90 * M, started=1, frozen=True)
    hi = call("hi", 1, cur=10 * M, high=500 * M, started=2)
    world = [session("hi", 9, [hi], agent_bytes=700 * M), session("lo", 1, [lo], agent_bytes=142 * M)]
    d1 = plan(snap(world, budget=1 * G, now=t0 + 10 * MS, state=st), rs)
    d2 = plan(snap(world, budget=1 * G, now=t0 + 320 * MS, state=d1.state), rs)
    assert [a.target for a in d2.actions if a.kind == "thaw"] == ["s-lo/c-1"]
    # while hi is at its mark, it stays frozen
    hi_asking = call("hi", 1, cur=495 * M, high=500 * M, started=2)
    busy = [session("hi", 9, [hi_asking], agent_bytes=215 * M), session("lo", 1, [lo], agent_bytes=142 * M)]
    d3 = plan(snap(busy, budget=1 * G, now=t0 + 320 * MS, state=d1.state,
                   usage=952 * M), load_ruleset({"rules": LADDER[1:], "ladder": {"calm_hold_ns": "300ms"}}))
    assert not any(a.kind == "thaw" for a in d3.actions)


def test_a_higher_priority_using_its_borrowed_headroom_is_pressure_before_it_reaches_its_mark():
    # hi holds a 400M mark it has used 250M of; lo holds 500M; the host is 10M from its reserve mark
    hi = call("hi", 1, cur=250 * M, high=400 * M, started=5)
    lo = call("lo", 1, cur=500 * M, high=600 * M, started=1)
    tight = snap([session("hi", 8, [hi], agent_bytes=50 * M), session("lo", 1, [lo], agent_bytes=183 * M)],
                 budget=1 * G)
    d = plan(tight, rules("burst_borrow"))
    assert [(f.kind, f.priority) for f in d.findings] == [("borrow", 8)]
    assert "promised 150M" in d.findings[0].measured
    # with room on the host the same promise is no pressure
    roomy = snap([session("hi", 8, [hi], agent_bytes=50 * M), session("lo", 1, [lo], agent_bytes=50 * M)],
                 budget=1 * G)
    assert plan(roomy, rules("burst_borrow")).findings == ()


# ---------------------------------------------------------------- no swap: grants backed by free memory


def _promised_total(s, actions, min_priority):
    """Host usage plus the unused headroom of the calls of priority >= min_priority once the
    actions are applied (lower priorities' headroom is what the throttle step takes back)."""
    high = {c.path: c.cg.memory_high_bytes for _s, c in s.calls()}
    for a in actions:
        if a.knob == "memory.high":
            high[a.target] = a.new
    return s.host.usage_bytes + sum(max(0, (high[c.path] or 0) - c.cg.memory_current_bytes)
                                    for ss, c in s.calls() if ss.priority >= min_priority)


def test_without_swap_a_grant_never_counts_on_what_lower_priorities_hold():
    s = _crowded_world(swap=0)
    d = plan(s, rules("burst_borrow"))
    limit = int(2 * G * 0.97)
    # with swap, hi was promised lo's memory (the test above); without, only the free budget backs it
    assert _promised_total(s, d.actions, 8) <= limit
    with_swap = _crowded_world()
    assert _promised_total(with_swap, plan(with_swap, rules("burst_borrow")).actions, 8) > limit
    assert [a.target for a in d.actions] == ["s-hi/c-1"]  # granted, from free memory only


def test_a_kill_planned_this_tick_backs_a_grant():
    from agentcg.core.policy.context import Ctx
    from agentcg.core.policy.grants import available_to
    lo = call("lo", 1, cur=300 * M, high=320 * M)
    s = snap([session("hi", 9, []), session("lo", 1, [lo])], budget=1 * G)
    ctx = Ctx(s, PolicyState())
    before = available_to(ctx, 9, 1 * G)
    ctx.kill(lo, Reason("kill", "test"), "stopped")
    assert available_to(ctx, 9, 1 * G) == before + 300 * M


def test_with_swap_lower_priorities_memory_counts_only_up_to_the_free_swap():
    from agentcg.core.policy.context import Ctx
    from agentcg.core.policy.grants import available_to
    lo = call("lo", 1, cur=600 * M, high=600 * M)
    sessions = [session("hi", 9, []), session("lo", 1, [lo])]
    none = available_to(Ctx(snap(sessions, budget=2 * G), PolicyState()), 9, 2 * G)
    some = available_to(Ctx(snap(sessions, budget=2 * G, swap=100 * M), PolicyState()), 9, 2 * G)
    lots = available_to(Ctx(snap(sessions, budget=2 * G, swap=8 * G), PolicyState()), 9, 2 * G)
    assert some == none + 100 * M and lots == none + 600 * M


def test_lower_priority_yields_room_to_a_higher_one_and_waits_without_pressure_or_kill():
    # hi is idle (agent only); lo's call is at its mark with the host at 78% of 1G: lo may not
    # take the last yield_pct (20%) + reserve (3%) of the budget, and nothing climbs the ladder
    rs = load_ruleset({"rules": LADDER, "ladder": {"calm_hold_ns": "300ms"}})
    st = PolicyState()
    t0 = 10**12
    for dt_s in (0, 1, 3, 6, 10):
        lo = call("lo", 1, cur=600 * M, high=600 * M, ev=MemEvents(high=1))
        s = snap([session("hi", 9, [], agent_bytes=100 * M), session("lo", 1, [lo], agent_bytes=100 * M)],
                 budget=1 * G, now=t0 + dt_s * 10**9, state=st)
        d = plan(s, rs)
        st = d.state
        assert [(f.kind, f.call) for f in d.findings] == [("yield", "s-lo/c-1")]
        assert "kept for higher priorities" in d.findings[0].threshold
        assert d.actions == () and st.level == 0
    # once no higher priority is there, lo borrows that room
    lo = call("lo", 1, cur=600 * M, high=600 * M, ev=MemEvents(high=1))
    d = plan(snap([session("lo", 1, [lo], agent_bytes=100 * M)], budget=1 * G, now=t0 + 11 * 10**9, state=st), rs)
    assert [(a.target, a.knob) for a in d.actions] == [("s-lo/c-1", "memory.high")] and d.actions[0].new > 600 * M


def test_a_new_lower_priority_call_starts_below_the_room_kept_for_higher_ones():
    lo = call("lo", 2, cur=0, high=None)
    s = snap([session("hi", 9, [], agent_bytes=300 * M), session("lo", 1, [lo], agent_bytes=400 * M)],
             budget=1 * G)
    d = plan(s, rules("burst_borrow"))
    [a] = [a for a in d.actions if a.target == "s-lo/c-2"]
    # 1G * (97% - 20%) - 700M in use = ~88M of room: the call starts there, not at the 64M default + more
    assert a.new <= int(1 * G * 0.77) - 700 * M
    s2 = snap([session("lo", 1, [lo], agent_bytes=400 * M)], budget=1 * G)
    [b] = [a for a in plan(s2, rules("burst_borrow")).actions if a.target == "s-lo/c-2"]
    assert b.new >= a.new


def test_a_small_lower_priority_call_is_not_throttled_from_its_first_page_by_the_yield_room():
    # 1G budget, 780M in use: nothing left below the room kept for hi, but 190M below the reserve mark
    lo = call("lo", 2, cur=0, high=None)
    s = snap([session("hi", 9, [], agent_bytes=380 * M), session("lo", 1, [lo], agent_bytes=400 * M)],
             budget=1 * G)
    [a] = [a for a in plan(s, rules("burst_borrow")).actions if a.target == "s-lo/c-2"]
    assert a.new == 16 * M and "starts with up to 16M" in a.reason.detail
    # where the budget itself is full, it gets only what is left
    s2 = snap([session("hi", 9, [], agent_bytes=580 * M), session("lo", 1, [lo], agent_bytes=400 * M)],
              budget=1 * G)
    [b] = [a for a in plan(s2, rules("burst_borrow")).actions if a.target == "s-lo/c-2"]
    assert b.new <= max(0, int(1 * G * 0.97) - 980 * M)
