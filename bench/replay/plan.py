"""Trace -> what one replayed session does, in trace seconds. Pure.

The agent process holds the container's memory outside tool calls (the
samples); during a call it keeps what it had at the call's start, and the
call process holds the rest: max(0, sample - base), reaching the recorded
mem_peak_mb. `Task` calls wrap a sub-agent (their nested calls carry the
memory) and a call that starts while another non-Task call runs holds
nothing of its own, so overlapping calls do not count the same memory twice.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MB = 1_000_000  # trace units are decimal MB


@dataclass
class CallPlan:
    t_start: float
    t_end: float
    cmd: str
    tool: str
    cpu_frac: float
    profile: list[tuple[float, int]]  # (seconds since call start, bytes the call holds)
    waits_for: list[int] = field(default_factory=list)  # earlier calls whose result it needs


@dataclass
class SessionPlan:
    trace: str
    duration_s: float
    agent: list[tuple[float, int]]  # (t, bytes the agent holds from t on)
    calls: list[CallPlan]
    avg_bytes: float
    peak_bytes: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SessionPlan":
        d = json.loads(text)
        d["calls"] = [CallPlan(**c) for c in d["calls"]]
        return cls(**d)


def load_trace(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def mem_at(samples: list, t: float) -> float:
    last = samples[0][1]
    for s in samples:
        if s[0] > t:
            break
        last = s[1]
    return last


def build_plan(trace: dict, scale: float, name: str = "") -> SessionPlan:
    samples = trace["samples"]
    calls = trace["tool_calls"]
    plans: list[CallPlan] = []
    running_end = -1.0
    for i, c in enumerate(calls):
        t0, t1 = c["t_start"], max(c["t_end"], c["t_start"] + 0.001)
        base = c["mem_base_mb"]
        own = c["tool"] != "Task" and t0 >= running_end
        prof: list[tuple[float, int]] = []
        cpu = 0.0
        window = [s for s in samples if t0 <= s[0] <= t1]
        if own:
            for s in window:
                prof.append((round(s[0] - t0, 3), int(max(0.0, s[1] - base) * MB * scale)))
            peak = int(max(0.0, c["mem_peak_mb"] - base) * MB * scale)
            if not prof or max(b for _t, b in prof) < peak:
                prof.append((round((t1 - t0) / 2, 3), peak))
                prof.sort()
            running_end = max(running_end, t1)
        win_cpu = [s[2] for s in samples if t0 <= s[0] <= t1 + 1.0]
        cpu = min(1.0, max(win_cpu, default=0.0) / 100.0) if c["tool"] == "Bash" else 0.0
        waits = [j for j, p in enumerate(plans) if p.t_end <= t0]
        plans.append(CallPlan(t0, t1, c.get("cmd", "") or c["tool"], c["tool"], cpu, prof,
                              waits[-3:]))
    # the agent: samples outside calls; frozen at the call's base inside
    agent: list[tuple[float, int]] = []
    spans = [(c["t_start"], c["t_end"], c["mem_base_mb"]) for c in calls]
    for t, mb, _cpu in samples:
        inside = [b for a, e, b in spans if a <= t <= e]
        val = min(inside) if inside else mb
        agent.append((t, int(val * MB * scale)))
    dur = trace["duration_s"]
    # time-average of the container's memory (step function over the samples)
    area = 0.0
    for (ta, ma, _), (tb, _mb, _c) in zip(samples, samples[1:]):
        area += ma * (tb - ta)
    avg = area / max(1e-9, samples[-1][0] - samples[0][0]) if len(samples) > 1 else samples[0][1]
    peak = max(s[1] for s in samples)
    return SessionPlan(name or trace.get("task", ""), dur, agent, plans, avg * MB * scale, int(peak * MB * scale))
