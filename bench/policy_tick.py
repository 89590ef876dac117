#!/usr/bin/env python3
"""The policy loop's own costs on a real cgroup v2 tree, side by side in one run.

  tick     one policy tick (snapshot of every session and call cgroup, plan;
           dry run, so nothing is written) over a tree of --sessions sessions
           with --calls tool calls each, reading the interface files
           (a) through descriptors kept open (OpenFiles, what the daemon does)
           and (b) by path (open, read, close per file); rounds interleaved.
  breach   a tool-call process about to allocate past its memory.high (it
           fills its cgroup to 2 MiB below the mark, notes the time, then
           allocates 4 MiB) -> the policy's write on that
           call's cgroup (burst borrowing raises the mark), through the real
           kernel signal path: memory.events change notification, wake, tick,
           write. --rounds fresh calls, one at a time, with the tree above
           around it.

Needs root and a cgroup2 mount with the memory controller (a cgroup v2 host,
or the kernel lab). Builds its tree under the mount and removes it. Writes
bench/results/policy_tick[-TAG].json.

    sudo python bench/policy_tick.py --sessions 4 --calls 3 --ticks 400 --rounds 30
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentcg.adapters.cgroupfs import CgroupFs, OpenFiles  # noqa: E402
from agentcg.core.intents import Intent  # noqa: E402
from agentcg.core.policy import load_ruleset  # noqa: E402
from agentcg.daemon.policy import PolicyLoop  # noqa: E402
from bench.replay.run import controlled_cgroup2, source_commit  # noqa: E402

MB = 1 << 20
CROSS_MARGIN_BYTES = 2 * MB


class ByPath(OpenFiles):
    """OpenFiles that opens, reads and closes the file every time (the variant to compare)."""

    def read(self, rel: str, name: str) -> str | None:
        return self.cgfs.read(rel, name)


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "mean": round(statistics.fmean(xs), 3) if xs else None}


def session_obj(name: str, prio: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, rel=f"s-{name}", calls={}, intent=Intent(priority=prio))


def call_obj(sess: SimpleNamespace, n: int) -> SimpleNamespace:
    return SimpleNamespace(rel=f"{sess.rel}/c-{n}", argv=["bench"], name="bench", start_ns=time.monotonic_ns(),
                           intent=Intent())


def build(cgfs: CgroupFs, n_sessions: int, n_calls: int) -> list[SimpleNamespace]:
    cgfs.enable_controllers("", ("memory", "cpu", "pids"))
    sessions = []
    for i in range(n_sessions):
        s = session_obj(f"b{i}", 8 if i % 2 == 0 else 2)
        cgfs.create(s.rel)
        cgfs.create(f"{s.rel}/agent")
        cgfs.enable_controllers(s.rel, ("memory", "cpu", "pids"))
        for n in range(1, n_calls + 1):
            c = call_obj(s, n)
            cgfs.create(c.rel)
            s.calls[n] = c
        sessions.append(s)
    return sessions


def tick_costs(cgfs: CgroupFs, sessions, ticks: int, ruleset) -> dict:
    loops = {}
    for name in ("kept_open", "by_path"):
        loop = PolicyLoop(cgfs, ruleset, dry_run=True)
        if name == "by_path":
            loop.files.close()
            loop.files = ByPath(cgfs)
        for s in sessions:
            loop.sessions[s.name] = s
        loops[name] = loop
    times: dict[str, list[float]] = {k: [] for k in loops}
    snaps: dict[str, list[float]] = {k: [] for k in loops}
    order = list(loops)
    for r in range(ticks):
        for name in (order if r % 2 == 0 else order[::-1]):
            loop = loops[name]
            t0 = time.perf_counter_ns()
            loop.snapshot()
            t1 = time.perf_counter_ns()
            loop.tick([])
            t2 = time.perf_counter_ns()
            snaps[name].append((t1 - t0) / 1000)
            times[name].append((t2 - t1) / 1000)
    for loop in loops.values():
        loop.close()
    out = {name: {"snapshot_us": summary(snaps[name]), "tick_us": summary(times[name])} for name in loops}
    out["tick_p50_ratio_by_path_vs_kept_open"] = round(out["by_path"]["tick_us"]["p50"] / out["kept_open"]["tick_us"]["p50"], 2)
    out["snapshot_p50_ratio_by_path_vs_kept_open"] = round(
        out["by_path"]["snapshot_us"]["p50"] / out["kept_open"]["snapshot_us"]["p50"], 2)
    return out


def touch(n: int) -> bytearray:
    buf = bytearray(n)
    buf[::4096] = b"\x01" * len(range(0, n, 4096))  # fault every page in
    return buf


def hog(ready_w: int, go_r: int, t_w: int) -> None:
    """Child: wait to be placed; fill its cgroup to just below the mark
    (told by the parent), note the time, then allocate past the mark; hold."""
    os.write(ready_w, b"r")
    below, cross = (int(x) for x in os.read(go_r, 64).split())
    held = [touch(below)]
    os.write(t_w, f"{time.monotonic_ns()}\n".encode())
    held.append(touch(cross))
    time.sleep(0.3)
    os._exit(0)


async def breach_rounds(cgfs: CgroupFs, sessions, rounds: int, ruleset) -> dict:
    loop = PolicyLoop(cgfs, ruleset)
    for s in sessions:
        loop.on_session_create(s, cgfs.path(s.rel))
    runner = asyncio.create_task(loop.run(None))
    delays, missed, signal_us, marks = [], 0, {}, []
    s = sessions[0]
    try:
        for r in range(rounds):
            n = 1000 + r
            c = call_obj(s, n)
            cgfs.create(c.rel)
            s.calls[n] = c
            loop.on_call_start(s, c, cgfs.path(c.rel))
            await asyncio.sleep(0.1)  # the start's own tick gave the call its mark
            high = cgfs.read_int(c.rel, "memory.high")
            if high is None:
                raise SystemExit("the policy gave the new call no memory.high: nothing to breach")
            marks.append(high)
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            t_r, t_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                hog(ready_w, go_r, t_w)
            os.read(ready_r, 1)
            cgfs.place(c.rel, pid)
            # up to CROSS_MARGIN below the mark first, untimed; the timed part crosses it
            below = max(0, high - (cgfs.read_int(c.rel, "memory.current") or 0) - CROSS_MARGIN_BYTES)
            os.write(go_w, f"{below} {2 * CROSS_MARGIN_BYTES}".encode())
            t_mark = int(os.read(t_r, 64).decode().strip())
            deadline = time.monotonic() + 3.0
            hit = None
            while time.monotonic() < deadline and hit is None:
                await asyncio.sleep(0.001)
                hit = next((a for a in list(loop.last) if a.action.target == c.rel and a.t_ns >= t_mark), None)
            if hit is None:
                missed += 1
            else:
                delays.append((hit.t_ns - t_mark) / 1e6)
            await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
            for fd in (ready_r, ready_w, go_r, go_w, t_r, t_w):
                os.close(fd)
            loop.on_call_end(s, c, cgfs.path(c.rel))
            del s.calls[n]
            cgfs.remove(c.rel)
        st = loop.status()
        signal_us = st["signal_to_action_us"]
    finally:
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
        loop.close()
    return {"mark_to_write_ms": summary(delays), "missed": missed, "daemon_signal_to_action_us": signal_us,
            "call_memory_high_bytes": sorted(set(marks)),
            "timed_from": f"{CROSS_MARGIN_BYTES // MB} MiB below the call's memory.high, allocating "
                          f"{2 * CROSS_MARGIN_BYTES // MB} MiB"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/policy_tick.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--calls", type=int, default=3, help="tool-call cgroups per session")
    ap.add_argument("--ticks", type=int, default=400, help="ticks per variant")
    ap.add_argument("--rounds", type=int, default=30, help="memory.high breaches")
    ap.add_argument("--budget-mb", type=int, default=2048, help="the tree's memory.max")
    ap.add_argument("--tag", default="", help="results file suffix (e.g. kernlab)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (it creates cgroups)")
    mnt = controlled_cgroup2()
    root = mnt / f"agentcg-bench-tick-{os.getpid()}"
    cgfs = CgroupFs(root)
    cgfs.create("")
    try:
        (root / "memory.max").write_text(str(a.budget_mb * MB))
        sessions = build(cgfs, a.sessions, a.calls)
        ruleset = load_ruleset({"preset": "adaptive"})
        print(f"tick: {a.ticks} per variant over {a.sessions} sessions x {a.calls} calls", file=sys.stderr)
        ticks = tick_costs(cgfs, sessions, a.ticks, ruleset)
        print(f"breach: {a.rounds} rounds", file=sys.stderr)
        breach = asyncio.run(breach_rounds(cgfs, sessions, a.rounds, ruleset))
    finally:
        cgfs.remove_tree("")
    res = {"params": {**vars(a), "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                      "commit": source_commit()},
           "tick": ticks, "breach": breach}
    out = Path(a.out) / f"policy_tick{'-' + a.tag if a.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({"tick_p50_us": {k: ticks[k]["tick_us"]["p50"] for k in ("kept_open", "by_path")},
                      "snapshot_p50_us": {k: ticks[k]["snapshot_us"]["p50"] for k in ("kept_open", "by_path")},
                      "mark_to_write_ms": breach["mark_to_write_ms"], "missed": breach["missed"]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
