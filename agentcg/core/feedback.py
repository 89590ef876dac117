"""Plain-words feedback for an agent: what the kernel did to its tool call.

Pure: `feedback(stats, limits, argv=...)` reads the numbers of one finished
call and returns `FeedbackItem`s, each with the numbers it speaks of and a
suggestion the agent can act on. An empty list means the kernel did not
intervene.

Scenarios (kind: description):

| kind | when |
|---|---|
| oom_kill | memory.events oom_kill > 0: the kernel killed a process at memory.max |
| memory_max | memory.events max > 0 without a kill: allocations hit memory.max and had to reclaim |
| memory_high | memory.events high > 0: the call was throttled above memory.high |
| pids_max | pids.events max > 0: fork/clone failed at pids.max |
| cpu_throttled | cpu.stat nr_throttled > 0: the call used up its cpu.max quota |
| stragglers_killed | processes outlived the call and were killed (cgroup.kill) |
| stragglers_kept | processes outlived the call and were left running (policy keep) |
| over_duration | the call ran more than twice its declared duration |
"""
from __future__ import annotations

import os
from typing import Sequence

from agentcg.core.model import CallStats, FeedbackItem, Limits
from agentcg.units import format_bytes

SCENARIOS = {
    "oom_kill": "the kernel killed a process of the call at its memory.max",
    "memory_max": "allocations hit memory.max and had to reclaim",
    "memory_high": "the call was throttled above memory.high",
    "pids_max": "fork/clone failed at pids.max",
    "cpu_throttled": "the call used up its cpu.max quota and waited",
    "stragglers_killed": "processes outlived the call and were killed",
    "stragglers_kept": "processes outlived the call and were left running",
    "over_duration": "the call ran more than twice its declared duration",
}


def _tool(argv: Sequence[str] | None) -> str:
    """The tool's base name, looking through 'python -m X', 'bash -c' and the like."""
    if not argv:
        return ""
    args = list(argv)
    name = os.path.basename(args[0])
    if name.startswith("python") and len(args) >= 3 and args[1] == "-m":
        return args[2]
    if name in ("bash", "sh", "dash", "zsh") and len(args) >= 3 and args[1] == "-c":
        first = args[2].strip().split()
        return os.path.basename(first[0]) if first else name
    if name in ("uv", "poetry") and len(args) >= 3 and args[1] == "run":
        return os.path.basename(args[2])
    return name


def _narrower(tool: str) -> str:
    """A concrete way to make the same work smaller, for well-known tools."""
    if tool in ("pytest", "py.test", "tox", "nox"):
        return "run a narrower test selection, e.g. pytest tests/test_x.py or pytest -k name"
    if tool in ("pip", "pip3", "uv", "poetry", "npm", "yarn", "pnpm", "cargo-install"):
        return "install fewer packages at a time"
    if tool in ("make", "ninja", "cargo", "cmake", "go", "mvn", "gradle", "bazel"):
        return "build with fewer parallel jobs (e.g. make -j2, cargo build -j2) or build one target"
    if tool in ("gcc", "g++", "clang", "clang++", "rustc", "tsc", "webpack"):
        return "compile fewer files at once"
    return "split the work into smaller steps"


def _mb_up(n: int) -> str:
    """A round size above n to suggest declaring."""
    step = 64 << 20
    return format_bytes(((n * 3 // 2) + step - 1) // step * step)


def feedback(stats: CallStats, limits: Limits, argv: Sequence[str] | None = None,
             duration_ns: int | None = None) -> list[FeedbackItem]:
    tool = _tool(argv)
    narrower = _narrower(tool)
    items: list[FeedbackItem] = []
    ev = stats.memory_events or {}
    peak = stats.memory_peak_bytes
    peak_s = format_bytes(peak) if peak is not None else "unknown"
    mmax = limits.memory_max_bytes
    mhigh = limits.memory_high_bytes

    oom_kills = ev.get("oom_kill", 0)
    if oom_kills > 0:
        nums = {"oom_kill": oom_kills, "oom": ev.get("oom", 0), "max_events": ev.get("max", 0)}
        if mmax is not None:
            nums["memory_max_bytes"] = mmax
        if peak is not None:
            nums["memory_peak_bytes"] = peak
        procs = f"{oom_kills} process{'es' if oom_kills != 1 else ''}"
        if ev.get("oom", 0) == 0:
            # memory.events counts "oom" at the cgroup whose limit was reached and
            # its ancestors, "oom_kill" at the victim's: oom 0 here means a limit
            # above the call (its session's cap or the shared budget) was reached
            items.append(FeedbackItem(
                "oom_kill",
                f"Out of memory: the memory budget this call shares with other tool calls and sessions "
                f"was full, and the kernel killed {procs} of this call (peak {peak_s}). The agent keeps running.",
                f"Retry when fewer tool calls run, or {narrower}.",
                nums))
        else:
            items.append(FeedbackItem(
                "oom_kill",
                f"Out of memory: the kernel killed {procs} of this "
                f"call when it reached its memory.max of {format_bytes(mmax)} (peak {peak_s}).",
                f"The work needs more than {format_bytes(mmax)}: {narrower}, or declare "
                f"memory_max={_mb_up(mmax or peak or 0)} if the session budget allows it.",
                nums))
    elif ev.get("max", 0) > 0:
        nums = {"max_events": ev["max"]}
        if mmax is not None:
            nums["memory_max_bytes"] = mmax
        if peak is not None:
            nums["memory_peak_bytes"] = peak
        items.append(FeedbackItem(
            "memory_max",
            f"Memory full: allocations hit the memory.max of {format_bytes(mmax)} {ev['max']} times "
            f"(peak {peak_s}); the kernel reclaimed memory to continue, which slows the call down.",
            f"If the work needs more, declare memory_max={_mb_up(mmax or peak or 0)}; otherwise {narrower}.",
            nums))

    if ev.get("high", 0) > 0 and mhigh is not None:
        nums = {"high_events": ev["high"], "memory_high_bytes": mhigh}
        if peak is not None:
            nums["memory_peak_bytes"] = peak
        items.append(FeedbackItem(
            "memory_high",
            f"Throttled: the call went above its memory.high of {format_bytes(mhigh)} "
            f"{ev['high']} times (peak {peak_s}) and was slowed down while the kernel reclaimed memory.",
            f"Declare memory={_mb_up(max(mhigh, peak or 0))} if the work needs it, or {narrower}.",
            nums))

    if (stats.pids_events_max or 0) > 0:
        nums = {"pids_max_events": stats.pids_events_max}
        if limits.pids_max is not None:
            nums["pids_max"] = limits.pids_max
        if stats.pids_peak is not None:
            nums["pids_peak"] = stats.pids_peak
        limit_s = str(limits.pids_max) if limits.pids_max is not None else "its pids.max"
        items.append(FeedbackItem(
            "pids_max",
            f"Process limit: {stats.pids_events_max} fork/clone calls failed because the call reached "
            f"{limit_s} processes and threads (peak {stats.pids_peak if stats.pids_peak is not None else 'unknown'}).",
            "Use fewer parallel workers (e.g. pytest -n 2, make -j2), or declare a higher pids_max "
            "if the work really needs that many.",
            nums))

    if (stats.cpu_nr_throttled or 0) > 0 and limits.cpu_max_pct is not None:
        waited_ms = (stats.cpu_throttled_usec or 0) // 1000
        items.append(FeedbackItem(
            "cpu_throttled",
            f"CPU capped: the call used up its cpu.max of {limits.cpu_max_pct}% of one CPU "
            f"{stats.cpu_nr_throttled} times and waited {waited_ms} ms in total.",
            f"Declare a higher cpu_max (e.g. cpu_max={max(200, limits.cpu_max_pct * 2)}%) if it is "
            "urgent, or accept the slower run.",
            {"nr_throttled": stats.cpu_nr_throttled, "throttled_ms": waited_ms,
             "cpu_max_pct": limits.cpu_max_pct}))

    if stats.stragglers > 0 and stats.stragglers_action == "killed":
        items.append(FeedbackItem(
            "stragglers_killed",
            f"Leftover processes: {stats.stragglers} process{'es' if stats.stragglers != 1 else ''} "
            "still ran after the command exited and were killed.",
            "If you meant to keep a server or watcher running, start it in its own tool call "
            "and keep that call open, or stop it explicitly before the command ends.",
            {"stragglers": stats.stragglers}))
    elif stats.stragglers > 0 and stats.stragglers_action == "kept":
        items.append(FeedbackItem(
            "stragglers_kept",
            f"Leftover processes: {stats.stragglers} process{'es' if stats.stragglers != 1 else ''} "
            "still run after the command exited; they keep counting against this session.",
            "Stop them when they are no longer needed (they are in this call's cgroup).",
            {"stragglers": stats.stragglers}))

    if duration_ns and stats.wall_ns > 2 * duration_ns:
        items.append(FeedbackItem(
            "over_duration",
            f"Slow: the call took {stats.wall_ns / 1e9:.1f} s, more than twice the declared "
            f"duration of {duration_ns / 1e9:.1f} s.",
            f"Declare duration={max(1, round(stats.wall_ns / 1e9))}s next time, or {narrower}.",
            {"wall_ms": stats.wall_ns // 1_000_000, "duration_ms": duration_ns // 1_000_000}))
    return items
