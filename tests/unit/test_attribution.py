from __future__ import annotations

import pytest

from agentcg.core.attribution import (Attribution, CallFinished, Escape, MoveToCall, NewCall, OomVictim,
                                      Place, ProcEvent)
from agentcg.core.rules_match import parse_rules

AGENT_CG, CALL1_CG, CALL2_CG, OTHER_CG = 100, 101, 102, 999


def ev(kind, tgid, ppid=0, cg=AGENT_CG, ts=0, **kw):
    return ProcEvent(kind=kind, pid=tgid, tgid=tgid, ppid=ppid, cgroup_id=cg, ts_ns=ts, **kw)


def auto(rules=None, escape="keep"):
    a = Attribution(rules=parse_rules(rules or []), escape_action=escape, default_intent={"cpu": "batch"})
    a.add_cgroup(AGENT_CG, "s1", None)
    a.register_agent("s1", tgid=50, agent_cgroup_id=AGENT_CG)
    return a


def test_child_of_agent_becomes_a_call_at_exec_with_rule_intent():
    a = auto([{"command": "pytest*", "intent": {"memory_max": "2G"}, "name": "tests"}])
    assert a.feed(ev("fork", 60, 50, comm="node")) == []
    d = a.feed(ev("exec", 60, 50, ts=1000, filename="/usr/bin/pytest", argv=("pytest", "-q")))
    assert len(d) == 1 and isinstance(d[0], NewCall)
    nc = d[0]
    assert nc.session == "s1" and nc.root_pid == 60 and nc.pids == (60,)
    assert nc.intent == {"memory_max": "2G"} and "tests" in nc.reason and nc.exec_ts_ns == 1000


def test_default_intent_when_no_rule_matches_and_descendants_move_along():
    a = auto([{"command": "pytest*", "intent": {}}])
    a.feed(ev("fork", 60, 50))
    a.feed(ev("fork", 61, 60))          # forked before exec: moves with 60
    a.feed(ev("fork", 62, 61))
    a.feed(ev("exit", 62, 61))          # gone: not moved
    nc = a.feed(ev("exec", 60, 50, filename="/bin/make", argv=("make", "all")))[0]
    assert nc.pids == (60, 61) and nc.intent == {"cpu": "batch"} and "session default" in nc.reason


def test_agent_forks_without_exec_and_grandchildren_are_no_calls():
    a = auto()
    a.feed(ev("fork", 60, 50))
    assert a.feed(ev("fork", 70, 60)) == []
    # 70 is not a direct child of the agent: its exec does not open a call
    assert a.feed(ev("exec", 70, 60, filename="/bin/ls")) == []


def test_fork_racing_the_move_is_followed_and_root_exit_finishes_call():
    a = auto()
    a.add_cgroup(CALL1_CG, "s1", 1)
    a.feed(ev("fork", 60, 50))
    nc = a.feed(ev("exec", 60, 50, filename="/bin/sh", argv=("sh", "-c", "x")))[0]
    a.call_placed("s1", 1, nc.pids, root_pid=60)
    # the kernel saw 60 fork while still in the agent cgroup (before the move landed)
    d = a.feed(ev("fork", 61, 60, cg=AGENT_CG, ts=5))
    assert d == [MoveToCall(session="s1", call=1, pid=61, fork_ts_ns=5, reason=d[0].reason)]
    # later forks are already in the call cgroup: nothing to do
    assert a.feed(ev("fork", 62, 60, cg=CALL1_CG)) == []
    assert a.place_of_pid(62) == Place("s1", 1)
    assert sorted(a.alive_pids("s1", 1)) == [60, 61, 62]
    tree = a.tree("s1", 1)
    assert tree[0]["pid"] == 60 and [c["pid"] for c in tree[0]["children"]] == [61, 62]
    a.feed(ev("exit", 61, 60, cg=CALL1_CG))
    a.feed(ev("exit", 62, 60, cg=CALL1_CG))
    done = a.feed(ev("exit", 60, 50, cg=CALL1_CG, exit_code=256))
    assert done == [CallFinished(session="s1", call=1, root_pid=60, exit_code=256, reason=done[0].reason)]
    assert a.call_ended("s1", 1) == []


def test_daemonised_grandchild_is_an_escape_with_reparenting():
    a = auto(escape="kill")
    a.add_cgroup(CALL1_CG, "s1", 1)
    a.feed(ev("fork", 60, 50))
    nc = a.feed(ev("exec", 60, 50, filename="/bin/sh"))[0]
    a.call_placed("s1", 1, nc.pids, root_pid=60)
    a.feed(ev("fork", 61, 60, cg=CALL1_CG))
    a.feed(ev("fork", 62, 61, cg=CALL1_CG))      # double fork
    a.feed(ev("exec", 62, 61, cg=CALL1_CG, filename="/usr/bin/sleep", argv=("sleep", "1000")))
    a.feed(ev("exit", 61, 60, cg=CALL1_CG))      # middle parent exits: 62 re-parented
    a.feed(ev("exit", 60, 50, cg=CALL1_CG))
    esc = a.call_ended("s1", 1)
    assert len(esc) == 1 and isinstance(esc[0], Escape)
    e = esc[0]
    assert e.pid == 62 and e.reparented and e.action == "kill" and "sleep 1000" == e.cmdline
    assert "parent 61 exited" in e.reason


def test_background_child_with_live_parent_is_reported_not_reparented():
    a = Attribution()
    a.add_cgroup(CALL2_CG, "s2", 3)
    a.feed(ev("fork", 80, 79, cg=CALL2_CG))   # parent unknown to us: client-mode call
    a.feed(ev("fork", 81, 80, cg=CALL2_CG))
    esc = a.call_ended("s2", 3)
    assert {e.pid for e in esc} == {80, 81}
    by_pid = {e.pid: e for e in esc}
    assert by_pid[81].reparented is False and by_pid[81].action == "keep"


def test_events_outside_known_cgroups_are_ignored_and_oom_reported():
    a = Attribution()
    a.add_cgroup(CALL1_CG, "s1", 1)
    assert a.feed(ev("fork", 5, 4, cg=OTHER_CG)) == [] and len(a) == 0
    d = a.feed(ev("oom", 7, 6, cg=CALL1_CG, comm="hog", ts=9))
    assert d == [OomVictim(session="s1", call=1, pid=7, comm="hog", cgroup_id=CALL1_CG, ts_ns=9)]


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="escape_action='maybe'"):
        Attribution(escape_action="maybe")
    with pytest.raises(ValueError, match="'clone'"):
        Attribution().feed(ev("clone", 1))
