"""Where an agent's KV cache waits during a tool call: five policies and the
resident reference, each a driver of the worker engine's own mechanisms.

Every policy acts only through what the worker offers: the session header
(or none), `suspend(mode, ttl_s)`, `resume`, and the engine's own eviction
when blocks run out (idle sessions leave least recently used first, kept ones
last; `preempt_mode="recompute"` makes that eviction a drop, as in vLLM,
otherwise the engine's cost model chooses swap or drop).

| policy | session | at call start | at call end | pressure eviction |
|---|---|---|---|---|
| recompute | none: blocks freed when a turn ends | - | - | drop |
| lru | kept until evicted | - | - | drop (LRU) |
| infercept | kept | discard / preserve / swap, least waste for the declared duration | - (swap-in when the next request arrives) | cost model |
| continuum | kept | keep, ttl_s = predicted gap to the next request (p75 of the command's history + request gap) | - | drop |
| agentcg | kept | core.kv_placement.place() with the durations estimate | resume (prefetch) | cost model |
| resident | kept, pool holds everything | - | - | (none happens) |
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from agentcg.core.durations import Durations
from agentcg.core.kv_blocks import GPU
from agentcg.core.kv_placement import PlacementConfig, PlacementInput, on_call_end, place
from agentcg.worker.engine import Engine, EngineError

from bench.agent_jct.clock import CpuTimeClock, WallClock
from bench.agent_jct.plan import AgentPlan, ToolCall


@dataclass
class Env:
    """What a policy sees: the engine, the durations history (fed at every call
    end, as the daemon's tool-call events would), a seeded random source."""
    engine: Engine
    durations: Durations
    rng: random.Random
    speedup: float
    clock: WallClock | CpuTimeClock
    request_gap_s: float = 0.0           # tool call end -> the agent's next request
    decisions: Counter = field(default_factory=Counter)

    def suspend(self, session: str, mode: str, ttl_s: float | None = None) -> None:
        try:
            with self.clock.compute():          # the swap-out copies are the engine's work
                self.engine.suspend(session, mode, ttl_s)
            self.decisions[mode] += 1
        except EngineError:              # evicted by pressure already: nothing left to place
            self.decisions["gone"] += 1

    def resume(self, session: str) -> None:
        try:
            with self.clock.compute():
                self.engine.resume(session)
            self.decisions["resume"] += 1
        except EngineError:              # dropped meanwhile, or no room: the request brings it back
            self.decisions["resume_failed"] += 1


class Policy:
    name = ""
    description = ""
    sessions = True                      # send the session name with every turn
    preempt_mode: str | None = None      # the engine's eviction under pressure
    resident = False                     # the pool holds every context

    def on_call_start(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        pass

    def on_call_end(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        pass


class Recompute(Policy):
    name = "recompute"
    description = "(a) no session: KV freed when a turn ends, every turn prefills its whole context (vLLM, no prefix caching)"
    sessions = False
    preempt_mode = "recompute"


class LruPrefix(Policy):
    name = "lru"
    description = "(b) contexts stay cached until pressure evicts them, least recently used first, by drop (vLLM automatic prefix caching)"
    preempt_mode = "recompute"


class InferCept(Policy):
    """Least waste (block-seconds) for the client-declared duration D, after
    InferCept (Abhyankar et al., ICML 2024): preserve = B·D; discard =
    t_recompute·(B + R); swap = t_swap·(B + R), where B is the session's
    blocks, R the blocks of the running batch, which the recompute or the
    transfer holds up. D = true duration × e^N(0, σ), the client's noisy
    declaration."""
    name = "infercept"
    description = "(c) discard / preserve / swap by least waste for a declared duration (true x lognormal noise)"

    def __init__(self, noise_sigma: float) -> None:
        self.noise_sigma = noise_sigma

    def on_call_start(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        e = env.engine
        t = e.bm.find_table("ses:" + agent.name)
        declared_s = call.duration_s * math.exp(env.rng.gauss(0.0, self.noise_sigma))
        if t is None or t.where != GPU:
            env.decisions["gone"] += 1
            return
        blocks = len(t.blocks)
        running = sum(len(x.blocks) for o, x in e.bm.tables.items() if o.startswith("req:") and x.where == GPU)
        tokens = len(e.sched.sessions[agent.name].tokens)
        waste = {"keep": blocks * declared_s,
                 "drop": e.cost.recompute_s(tokens) * (blocks + running)}
        if e.bm.can_swap_out(t.owner):
            waste["swap"] = e.cost.swap_s(blocks * e.kv.block_bytes) * (blocks + running)
        env.suspend(agent.name, min(waste, key=waste.__getitem__))


class Continuum(Policy):
    name = "continuum"
    description = "(d) pin the KV for a time-to-live = p75 of the command's duration history, then drop it"
    preempt_mode = "recompute"

    def on_call_start(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        est = env.durations.estimate(agent.name, call.command)
        # the engine sees the gap between two requests: the call and the client's turnaround
        env.suspend(agent.name, "keep", ttl_s=est.p75_s + env.request_gap_s)


class Agentcg(Policy):
    name = "agentcg"
    description = ("(e) exact tool-call boundaries: suspend at call start in the mode core.kv_placement chooses "
                   "from the durations estimate, resume (prefetch) at call end before the next request")

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}

    def on_call_start(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        stats = env.engine.stats()
        if agent.name not in stats["sessions"]:
            env.decisions["gone"] += 1
            self.modes[agent.name] = "drop"
            return
        est = env.durations.estimate(agent.name, call.command)
        inp = PlacementInput.from_worker_stats(stats, agent.name, expected_duration_s=est.duration_s)
        # the whole replay runs `speedup` times faster, the "too short to move" floor with it
        cfg = PlacementConfig(keep_below_s=PlacementConfig().keep_below_s / env.speedup)
        mode = place(inp, cfg).mode
        self.modes[agent.name] = mode
        env.suspend(agent.name, mode)

    def on_call_end(self, env: Env, agent: AgentPlan, call: ToolCall) -> None:
        if on_call_end(self.modes.pop(agent.name, "drop")).op == "resume":
            env.resume(agent.name)


class Resident(Policy):
    name = "resident"
    description = "reference: the pool holds every context, nothing is ever moved"
    resident = True


def all_policies(noise_sigma: float) -> list[Policy]:
    return [Recompute(), LruPrefix(), InferCept(noise_sigma), Continuum(), Agentcg(), Resident()]
