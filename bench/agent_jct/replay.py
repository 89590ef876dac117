"""One policy's replay: N agents against one engine, on the replay clock
(bench/agent_jct/clock.py: wall time on CUDA, this thread's CPU time plus
skipped idle time on CPU).

A single thread runs the loop (the engine is single-threaded anyway): due
events first (a tool call ends: the policy's call-end hook, the duration is
recorded; `request_gap_s` later the agent's next request arrives), then one
engine step if the engine has work, else a sleep until the next event. The
step's tokens are timed when it returns (its `.tolist()` waits for the
device). Only engine calls (step, add_request, suspend, resume) count as
compute; the policies' own decisions are the daemon's, in another process. A turn that finishes starts the agent's next tool call at once (the
policy's call-start hook).

Block-seconds idle-held integrate, between loop iterations, the device blocks
of the sessions whose agent is inside a tool call.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from agentcg.core.durations import Durations
from agentcg.core.kv_blocks import GPU
from agentcg.worker.engine import Engine, Request

from bench.agent_jct.clock import CpuTimeClock, WallClock
from bench.agent_jct.plan import AgentPlan
from bench.agent_jct.policies import Env, Policy

TOOL, GAP, LLM, DONE = "tool", "gap", "llm", "done"


@dataclass
class Agent:
    plan: AgentPlan
    turn: int = 0
    context: list[int] = field(default_factory=list)     # everything sent and answered so far
    phase: str = GAP
    due_s: float = 0.0                                     # when the tool call ends / the request arrives
    submit_s: float = 0.0
    answer: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    ttft_after_tool_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    new_tokens: int = 0                                    # tokens no earlier turn computed

    @property
    def request_id(self) -> str:
        return f"{self.plan.name}-t{self.turn}"


@dataclass
class PolicyRun:
    policy: str
    agents: list[Agent]
    wall_s: float
    makespan_s: float
    idle_held_block_s: float
    swap_out_bytes: int
    swap_in_bytes: int
    prefilled_tokens: int
    new_tokens: int
    decisions: dict
    engine_counters: dict
    preemptions: dict
    truncated: bool

    @property
    def recompute_tokens(self) -> int:
        return self.prefilled_tokens - self.new_tokens


def _ttl_deadlines(engine: Engine) -> list[float]:
    return [c.expires_at_s for c in engine.sched.sessions.values() if c.expires_at_s is not None]


def _idle_blocks(engine: Engine, agents: list[Agent]) -> int:
    n = 0
    for a in agents:
        if a.phase == TOOL:
            t = engine.bm.find_table("ses:" + a.plan.name)
            if t is not None and t.where == GPU:
                n += len(t.blocks)
    return n


def run_policy(engine: Engine, policy: Policy, plans: list[AgentPlan], *, history: list[tuple[str, float]],
               request_gap_s: float, speedup: float, seed: int, clock: WallClock | CpuTimeClock,
               max_seconds: float | None = None) -> PolicyRun:
    """Replay every agent to its last turn (or until max_seconds) under one policy.
    history: (command, duration) of earlier runs on the host, scaled like the calls."""
    durations = Durations(default_s=Durations().default_s / speedup)
    for cmd, d in history:
        durations.record("host-history", cmd, d)
    env = Env(engine, durations, random.Random(seed), speedup, clock, request_gap_s)
    engine.clock = clock.now
    agents = [Agent(p) for p in plans]
    by_request: dict[str, Agent] = {}
    swap0 = dict(engine.swapper.bytes)
    prefilled0 = engine.counters["prefilled_tokens"]
    counters0 = dict(engine.counters)
    idle_block_s = 0.0
    wall = WallClock()             # max_seconds is real time, whatever the replay clock
    last = clock.now()
    truncated = False
    now = clock.now

    def submit(a: Agent, t: float) -> None:
        added = a.plan.added[a.turn]
        a.new_tokens += len(added) + (1 if a.turn else 0)     # the last answer token was never run
        a.context.extend(added)
        a.phase, a.submit_s, a.answer = LLM, t, []
        by_request[a.request_id] = a
        with clock.compute():
            engine.add_request(Request(a.request_id, list(a.context), max_tokens=a.plan.answer_tokens,
                                       session_id=a.plan.name if policy.sessions else None))

    def finish_turn(a: Agent, t: float) -> None:
        del by_request[a.request_id]
        a.context.extend(a.answer)
        a.outputs.append(a.answer)
        a.turn += 1
        if a.turn >= a.plan.turns:
            a.phase, a.end_s = DONE, t
            return
        call = a.plan.calls[a.turn - 1]
        a.phase, a.due_s = TOOL, t + call.duration_s
        policy.on_call_start(env, a.plan, call)

    while any(a.phase != DONE for a in agents):
        t = now()
        if max_seconds is not None and wall.now() > max_seconds:
            truncated = True
            break
        idle_block_s += _idle_blocks(engine, agents) * (t - last)
        last = t
        for a in sorted(agents, key=lambda a: a.due_s):
            if a.phase == TOOL and a.due_s <= t:
                call = a.plan.calls[a.turn - 1]
                durations.record(a.plan.name, call.command, call.duration_s)
                policy.on_call_end(env, a.plan, call)
                a.phase, a.due_s = GAP, t + request_gap_s
            if a.phase == GAP and a.due_s <= t:
                submit(a, t)
        ttl_due = any(d <= t for d in _ttl_deadlines(engine))
        if engine.has_work() or ttl_due:
            with clock.compute():
                events = engine.step()
            t = now()
            for ev in events:
                a = by_request[ev.request_id]
                if not a.answer and a.turn > 0:
                    a.ttft_after_tool_s.append(t - a.submit_s)
                a.answer.append(ev.token_id)
                if ev.finished:
                    finish_turn(a, t)
            continue
        waits = [a.due_s for a in agents if a.phase in (TOOL, GAP)]
        waits += _ttl_deadlines(engine)
        if waits:
            clock.idle_until(min(waits))
    with clock.compute():
        engine.swapper.synchronize()
    return PolicyRun(
        policy=policy.name, agents=agents, wall_s=wall.now(), makespan_s=now(), idle_held_block_s=idle_block_s,
        swap_out_bytes=engine.swapper.bytes["out"] - swap0["out"],
        swap_in_bytes=engine.swapper.bytes["in"] - swap0["in"],
        prefilled_tokens=engine.counters["prefilled_tokens"] - prefilled0,
        new_tokens=sum(a.new_tokens for a in agents if a.phase != LLM),
        decisions=dict(env.decisions),
        engine_counters={k: v - counters0.get(k, 0) for k, v in engine.counters.items()},
        preemptions=dict(engine.sched.preemptions), truncated=truncated)

