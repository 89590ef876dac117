"""What `agentcg top` shows, as plain lines: a pure function of the daemon's
`status` and `session.show` replies and the policy actions seen, so that the
live view and `--once` print the same frame and tests need no terminal.

Only what the daemon sends is shown. It reports no live PSI reading: the
pressure column is the stall the policy last acted on for the session (the
`measured` of its latest `psi_pressure` action), "-" while it acted on none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import output as out
from .common import time_ns

# the memory ladder's steps by level (agentcg/core/policy/ladder.py)
LADDER_STEPS = ("none", "throttle", "reclaim", "freeze", "kill")
MAX_ACTIONS = 8
CALL_HEADERS = ["CALL", "NAME", "PID", "TIME", "MEM", "MEM.HIGH", "MEM.MAX", "CPU"]


class Line(NamedTuple):
    text: str
    bold: bool = False


@dataclass
class Frame:
    """One refresh: the daemon's replies (status None when it was not reached)."""
    status: dict[str, Any] | None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    time_s: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "sessions": self.sessions}


def merge_actions(seen: list[dict[str, Any]], new: list[dict[str, Any]], keep: int = 50) -> list[dict[str, Any]]:
    """Policy actions from the event stream and from status, each once, oldest first."""
    by_key = {_action_key(a): a for a in seen}
    for a in new:
        by_key.setdefault(_action_key(a), a)
    merged = sorted(by_key.values(), key=lambda a: a.get("t_ns") or 0)
    return merged[-keep:]


def _action_key(a: dict[str, Any]) -> tuple:
    return (a.get("t_ns"), a.get("target"), a.get("knob"), a.get("kind"), a.get("line") or a.get("text"))


def frame_lines(frame: Frame, *, now_mono_ns: int | None = None) -> list[Line]:
    now_mono_ns = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    lines = _header(frame)
    if frame.status is None:
        return lines
    if not frame.sessions:
        lines.append(Line("no sessions"))
    for s in frame.sessions:
        lines.extend(_session_lines(s, frame.actions, now_mono_ns))
        lines.append(Line(""))
    lines.extend(_action_lines(_policy(frame.status), frame.actions, now_mono_ns))
    return lines


def _policy(status: dict[str, Any]) -> dict[str, Any] | None:
    policy = (status.get("hooks") or {}).get("policy")
    return policy if isinstance(policy, dict) else None


def _header(frame: Frame) -> list[Line]:
    clock = time.strftime("%H:%M:%S", time.localtime(frame.time_s))
    if frame.status is None:
        return [Line(f"agentcg top  {clock}", True), Line(f"agentcgd: {frame.error or 'no reply'}")]
    st = frame.status
    d = st.get("daemon") or {}
    up = out.duration_ns(d["uptime_s"] * 1e9) if isinstance(d.get("uptime_s"), (int, float)) else "-"
    lines = [Line(f"agentcg top  {clock}  agentcgd pid {d.get('pid', '-')}  up {up}  "
                  f"sessions {st.get('sessions', '-')}  running calls {st.get('running_calls', '-')}", True)]
    policy = _policy(st)
    if policy is None:
        lines.append(Line("policy: not running"))
    else:
        level = policy.get("ladder_level")
        step = LADDER_STEPS[level] if isinstance(level, int) and 0 <= level < len(LADDER_STEPS) else "?"
        frozen = ", ".join(policy.get("frozen") or []) or "-"
        tick = (policy.get("tick_us") or {}).get("p50")
        lines.append(Line(f"policy: ladder level {level} ({step})  frozen {frozen}  ticks {policy.get('ticks', '-')}"
                          + (f"  tick p50 {tick:.0f}us" if isinstance(tick, (int, float)) else "")
                          + ("  dry run" if policy.get("dry_run") else "")))
    controllers = ",".join(d.get("controllers") or []) or "none"
    lines.append(Line(f"root {d.get('cgroup_root', '-')}  controllers {controllers}"))
    if frame.error:
        lines.append(Line(f"agentcgd: {frame.error}"))
    lines.append(Line(""))
    return lines


def _session_lines(s: dict[str, Any], actions: list[dict[str, Any]], now_mono_ns: int) -> list[Line]:
    limits = s.get("limits") or {}
    head = (f"session {s.get('name')}  uid {s.get('uid', '-')}  calls {s.get('running_calls', 0)} running, "
            f"{s.get('calls_done', 0)} done  created {out.age(time_ns(s.get('created_time')))}")
    budget = (f"  memory.low {out.size(limits.get('memory_low_bytes'))}  "
              f"memory.high {out.size(limits.get('memory_high_bytes'))}  "
              f"memory.max {out.size(limits.get('memory_max_bytes'))}  "
              f"pressure {_pressure(s.get('name'), actions, now_mono_ns)}")
    lines = [Line(head, True), Line(budget)]
    calls = s.get("calls") or []
    if not calls:
        return lines + [Line("  no running calls")]
    rows = []
    for c in calls:
        stats, climits = c.get("stats") or {}, c.get("limits") or {}
        cpu_us = stats.get("cpu_usage_usec")
        rows.append([f"c-{c.get('call')}", c.get("name") or "-", c.get("pid"),
                     out.duration_ns(c["running_s"] * 1e9) if isinstance(c.get("running_s"), (int, float)) else "-",
                     out.size(stats.get("memory_current_bytes")), out.size(climits.get("memory_high_bytes")),
                     out.size(climits.get("memory_max_bytes")),
                     out.duration_ns(cpu_us * 1000) if isinstance(cpu_us, int) else "-"])
    return lines + [Line("  " + row, i == 0) for i, row in enumerate(out.table(CALL_HEADERS, rows).splitlines())]


def _pressure(session: Any, actions: list[dict[str, Any]], now_mono_ns: int) -> str:
    for a in reversed(actions):
        reason = a.get("reason") or {}
        if a.get("session") == session and isinstance(reason, dict) and reason.get("rule") == "psi_pressure":
            over = f" > {reason['threshold']}" if reason.get("threshold") else ""
            return f"{reason.get('measured') or '?'}{over} ({_ago(a, now_mono_ns)})"
    return "-"


def _ago(action: dict[str, Any], now_mono_ns: int) -> str:
    t_ns = action.get("t_ns")   # the daemon's CLOCK_MONOTONIC, the same clock as ours on one host
    if isinstance(t_ns, int) and t_ns <= now_mono_ns:
        return out.duration_ns(now_mono_ns - t_ns) + " ago"
    return out.age(time_ns(action.get("time")))


def _action_lines(policy: dict[str, Any] | None, actions: list[dict[str, Any]], now_mono_ns: int) -> list[Line]:
    if policy is None:
        return []
    shown = actions[-MAX_ACTIONS:]
    lines = [Line("last policy actions", True)]
    if not shown:
        return lines + [Line("  none")]
    return lines + [Line(f"  {_ago(a, now_mono_ns):>11}  {a.get('line') or a.get('text') or a.get('kind')}")
                    for a in reversed(shown)]
