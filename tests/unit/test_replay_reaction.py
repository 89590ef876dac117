"""The replay's reaction metric: a call's event -> the policy's first action on that call."""
from __future__ import annotations

import pytest

run = pytest.importorskip("bench.replay.run")

MS = 1_000_000


def _agents():
    # session r0: call 3 reaches its mark at t=100ms and again (a new mark) at t=900ms;
    # call 4 bursts at t=200ms; session r1: call 3 reaches its mark at 300ms
    return [{"i": 0, "bursts": [(3, 100 * MS, "mark"), (4, 200 * MS, "burst"), (3, 900 * MS, "mark")]},
            {"i": 1, "bursts": [(3, 300 * MS, "mark")]}]


def test_mark_reaction_is_the_first_action_on_that_call_after_it():
    actions = [{"target": "s-r0/c-3", "t_ns": 50 * MS},      # before the event: not an answer
               {"target": "s-r0/c-3", "t_ns": 104 * MS},
               {"target": "s-r0/c-3", "t_ns": 110 * MS},
               {"target": "s-r1/c-3", "t_ns": 3300 * MS},    # more than 2 s later: left alone
               {"target": "s-r0/c-4", "t_ns": 201 * MS}]
    delays, open_ = run.reactions_ms(_agents(), actions, "mark")
    assert delays == [4.0] and open_ == 2   # r0/c-3's second mark and r1/c-3 got no action in time
    bursts, b_open = run.reactions_ms(_agents(), actions, "burst")
    assert bursts == [1.0] and b_open == 0


def test_actions_on_another_session_with_the_same_call_number_do_not_count():
    actions = [{"target": "s-r1/c-3", "t_ns": 101 * MS}]
    delays, open_ = run.reactions_ms([_agents()[0]], actions, "mark")
    assert delays == [] and open_ == 2


def test_agents_alone_peak_is_the_largest_sum_of_the_agents_timelines():
    from bench.replay.plan import SessionPlan
    a = SessionPlan("a", 10, [(0.0, 10), (1.0, 90), (5.0, 20)], [], 0, 90)
    b = SessionPlan("b", 10, [(0.0, 5), (2.0, 70), (3.0, 10)], [], 0, 70)
    assert run.agents_alone_peak([a, b]) == 160   # 90 + 70 during [2, 3)
