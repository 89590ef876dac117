#!/usr/bin/env python3
"""Containment: a bomb in one tool call against a steady session, through the real daemon.

A session "steady" runs --calls small tool calls one after another, each the
same fixed work (a shell counting loop of --work-iters). It runs three
times per bomb, in one run: alone, with the bomb running in a tool call of
another session, and alone again. Bombs:

  fork     `f(){ f|f& }; f` in a session with pids_max=--fork-pids, held
           until the steady phase is over; then its main process is killed
           and the daemon kills what is left at call.end (stragglers).
  memory   a process allocating and touching memory at --mem-rate bytes/s
           (2 GB/s by default) without a limit of its own, in a session with
           memory_max=--mem-max: stopped by the kernel at memory.max (the
           whole call, memory.oom.group).

Recorded per bomb: the steady session's wall time per phase and the
slowdown ratio (with bomb / mean of the two alone phases), whether every
steady call finished with status 0 within --deadline-s, whether the bomb
was stopped and how (its stats: pids.peak and pids.max events, or the OOM
kill at memory.max, peak, exit status); and the daemon: same pid answering
status from start to end, its uptime. Needs root and a cgroup2 mount with
memory, pids and cpu (a cgroup v2 host or the kernel lab). Writes
bench/results/reliability/containment.json (--out DIR).

    sudo python bench/containment.py --calls 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentcg.adapters.cgroupfs import CgroupFs  # noqa: E402
from agentcg.client import Client  # noqa: E402
from bench.replay.run import controlled_cgroup2, source_commit  # noqa: E402

MB = 1 << 20
# the shell forks its sleep first: once the bomb fills pids.max it could not
FORK_BOMB = "sleep 3600 & s=$!; f(){ f|f& }; f 2>/dev/null; wait $s"
MEM_BOMB = """
import sys, time
rate, chunk = int(sys.argv[1]), 16 << 20
held, t0 = [], time.monotonic()
while True:
    held.append(b"x" * chunk)          # touched: every page is resident
    ahead = len(held) * chunk / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
"""


class Daemon:
    """agentcgd as a process of its own, with its tree and runtime directory."""

    def __init__(self, mount: Path):
        self.tag = f"agentcg-bench-containment-{os.getpid()}"
        self.root = mount / self.tag
        self.runtime = Path(tempfile.mkdtemp(prefix=self.tag))
        self.socket = str(self.runtime / "agentcg.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--cgroup-root", str(self.root),
                                      "--runtime-dir", str(self.runtime), "--log-level", "warning"],
                                     cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise SystemExit(f"agentcgd exited: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise SystemExit("agentcgd did not start listening")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        with Client(self.socket) as c:
            return c.status()["daemon"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        CgroupFs(self.root).remove_tree("")   # the sessions are ended: the daemon's leaf and spares
        shutil.rmtree(self.runtime, ignore_errors=True)


def steady_phase(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """--calls tool calls of fixed work in session "steady"; wall times as the client sees them."""
    s = client.get_session("steady")
    walls_ms, statuses = [], []
    deadline = time.monotonic() + args.deadline_s
    t0 = time.monotonic()
    for _ in range(args.calls):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        t = time.monotonic()
        h = s.tool_call("work").popen(["sh", "-c", f"i=0; while [ $i -lt {args.work_iters} ]; do i=$((i+1)); done"])
        try:
            r = h.wait(timeout=left)
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()
            break
        walls_ms.append((time.monotonic() - t) * 1e3)
        statuses.append(r.exit_status)
    return {"calls": len(walls_ms), "ok": sum(1 for x in statuses if x == 0),
            "finished": len(walls_ms) == args.calls and all(x == 0 for x in statuses),
            "wall_s": round(time.monotonic() - t0, 3),
            "call_ms_p50": round(statistics.median(walls_ms), 2) if walls_ms else None,
            "call_ms_max": round(max(walls_ms), 2) if walls_ms else None}


def fork_bomb(client: Client, args: argparse.Namespace) -> tuple[Any, Any]:
    s = client.session("fork-bomb", intent={"pids_max": args.fork_pids}, end_on_exit=False)
    return s, s.tool_call("bomb").popen(["sh", "-c", FORK_BOMB], stderr=subprocess.DEVNULL)


def memory_bomb(client: Client, args: argparse.Namespace) -> tuple[Any, Any]:
    s = client.session("mem-bomb", intent={"memory_max": args.mem_max}, end_on_exit=False)
    return s, s.tool_call("bomb").popen([sys.executable, "-S", "-c", MEM_BOMB, str(args.mem_rate)],
                                        stderr=subprocess.DEVNULL)


def stop_fork_bomb(h: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Still held at pids.max after the steady phase: kill its main process; call.end kills the rest."""
    running = h.proc.poll() is None
    h.kill()
    r = h.wait(timeout=120)
    st = r.stats
    stopped = st.get("pids_peak") is not None and st["pids_peak"] <= r.limits["pids_max"] \
        and (st.get("pids_events_max") or 0) >= 1 and st.get("stragglers_action") != "kept"
    return {"stopped": bool(stopped), "main_running_at_end": running,
            "how": f"held at pids.max {r.limits['pids_max']} (peak {st.get('pids_peak')}, "
                   f"{st.get('pids_events_max')} forks refused) for the whole steady phase; "
                   f"{st.get('stragglers')} processes left at call end, {st.get('stragglers_action')} by the daemon",
            "exit_status": r.exit_status, "pids_max": r.limits["pids_max"], "pids_peak": st.get("pids_peak"),
            "pids_events_max": st.get("pids_events_max"), "stragglers": st.get("stragglers"),
            "stragglers_action": st.get("stragglers_action"), "call_wall_s": round(st["wall_ns"] / 1e9, 3)}


def stop_memory_bomb(h: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Stopped by the kernel at memory.max, soon; still running after --deadline-s: it was not."""
    try:
        h.proc.wait(timeout=args.deadline_s)
        running = False
    except subprocess.TimeoutExpired:
        running = True
        h.kill()
    r = h.wait(timeout=120)
    st = r.stats
    oom = (st.get("memory_events") or {}).get("oom_kill", 0)
    wall_s = st["wall_ns"] / 1e9
    kills = [a for a in policy_actions(h) if a.get("kind") == "kill"]
    at = f"memory.max {r.limits.get('memory_max_bytes', 0) // MB}M (peak {(st.get('memory_peak_bytes') or 0) // MB}M)"
    if running:
        how = f"still running after {args.deadline_s}s: killed by the benchmark"
    elif oom >= 1:
        how = f"the kernel's OOM kill at {at}, after {wall_s:.2f}s"
    elif kills:
        how = f"killed by the policy near {at}, after {wall_s:.2f}s: {kills[0].get('line') or kills[0]}"
    else:
        how = f"exited with status {r.exit_status} after {wall_s:.2f}s, no kill recorded"
    return {"stopped": not running and r.exit_status == 137 and (oom >= 1 or bool(kills)), "how": how,
            "policy_kills": len(kills), "memory_events": st.get("memory_events"),
            "exit_status": r.exit_status, "memory_max_bytes": r.limits.get("memory_max_bytes"),
            "memory_peak_bytes": st.get("memory_peak_bytes"), "oom_kill": oom, "call_wall_s": round(wall_s, 3),
            "achieved_bytes_per_s": round((st.get("memory_peak_bytes") or 0) / wall_s) if wall_s > 0 else None,
            "feedback": [f.get("kind") for f in r.feedback]}


def policy_actions(h: Any) -> list[dict[str, Any]]:
    """The policy's actions on the call's cgroup, from the event log."""
    target = f"s-{h.call.session.name}/c-{h.number}"
    with Client(h.call.session.client.socket_path) as c:
        return [e for e in c.events() if e.get("type") == "policy.action" and e.get("target") == target]


BOMBS = {"fork": (fork_bomb, stop_fork_bomb), "memory": (memory_bomb, stop_memory_bomb)}


def one_bomb(d: Daemon, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    start, stop = BOMBS[kind]
    steady, bombs = Client(d.socket, timeout_s=120), Client(d.socket, timeout_s=120)
    try:
        alone_before = steady_phase(steady, args)
        s, h = start(bombs, args)
        with_bomb = steady_phase(steady, args)
        bomb = stop(h, args)
        s.end(force=True)
        alone_after = steady_phase(steady, args)
    finally:
        steady.close(), bombs.close()
    alone_s = statistics.mean([alone_before["wall_s"], alone_after["wall_s"]])
    return {"steady_alone_before": alone_before, "steady_with_bomb": with_bomb, "steady_alone_after": alone_after,
            "slowdown_ratio": round(with_bomb["wall_s"] / alone_s, 3) if alone_s else None,
            "steady_all_finished": alone_before["finished"] and with_bomb["finished"] and alone_after["finished"],
            "bomb": bomb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="steady tool calls per phase")
    ap.add_argument("--work-iters", type=int, default=3000, help="shell loop iterations per steady call")
    ap.add_argument("--fork-pids", type=int, default=64, help="pids_max of the fork bomb's session")
    ap.add_argument("--mem-max", default="1G", help="memory_max of the memory bomb's session")
    ap.add_argument("--mem-rate", type=int, default=2 << 30, help="memory bomb's allocation rate, bytes/s")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="the most one steady phase may take")
    ap.add_argument("--bombs", default="fork,memory", help="comma-separated: fork, memory")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability"))
    ap.add_argument("--host", default="kernlab" if os.environ.get("KERNLAB") == "1" else platform.node())
    args = ap.parse_args(argv)
    mount = controlled_cgroup2(("memory", "cpu", "pids"))
    d = Daemon(mount)
    try:
        first = d.status()
        with Client(d.socket) as c:
            c.session("steady", end_on_exit=False)
        results: dict[str, Any] = {}
        for kind in args.bombs.split(","):
            results[kind] = one_bomb(d, kind, args)
            results[kind]["daemon_pid_after"] = d.status()["pid"]
        last = d.status()
        with Client(d.socket) as c:
            c.request("session.end", name="steady", force=True)
    finally:
        d.stop()
    out = {"params": {**{k: v for k, v in vars(args).items() if k != "out"}, "kernel": platform.release(),
                      "cpus": os.cpu_count(), "commit": source_commit()},
           **results,
           "daemon": {"pid": first["pid"], "same_pid_throughout": all(r["daemon_pid_after"] == first["pid"]
                                                                      for r in results.values()) and
                      last["pid"] == first["pid"], "uptime_s": last["uptime_s"],
                      "exit_status": d.proc.returncode}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "containment.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: {"slowdown_ratio": v["slowdown_ratio"], "steady_all_finished": v["steady_all_finished"],
                          "bomb_stopped": v["bomb"]["stopped"], "how": v["bomb"]["how"]}
                      for k, v in results.items()}, indent=1))
    print(f"daemon: {out['daemon']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
