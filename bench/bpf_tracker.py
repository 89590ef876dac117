"""Benchmark of the eBPF tracker (not a test). Needs root, BTF and a cgroup2 mount.

    python bench/bpf_tracker.py [--rounds 10] [--spawns 200] [--load-s 3] [--calls 200]

Measures, in one run:
  overhead_ns_per_spawn   cost of one traced fork+exec+exit of /bin/true inside the
                          watched subtree: median of rounds with the tracker attached
                          minus median of rounds without, rounds interleaved
  events_per_s_lossless   events/s consumed while 2 spawner processes (one per core)
                          run flat out, with the ring buffer's lost-event counter at 0
  placement_p50_us/p99_us automatic mode through the real agentcgd: time from the
                          child's exec (kernel timestamp) to its move into a fresh
                          tool-call cgroup
  stop_on/stop_off        automatic mode with [bpf] stop_until_placed on and off, in
                          alternating daemon runs: each child's first action reads its
                          own cgroup (grep ^0:: /proc/self/cgroup); outside_first_action
                          counts those that saw the agent's cgroup instead of their call's;
                          outside_us is how long a child could run outside its call
                          (exec -> placement when not stopped, 0 when stopped: it runs only
                          after SIGCONT, sent after the move); exec_to_continued_us is the
                          exec latency the stop adds (exec -> SIGCONT sent)
Writes bench/results/bpf_tracker.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentcg.adapters.bpf import Tracker, cgroup_id  # noqa: E402
from agentcg.adapters.libbpf import Libbpf  # noqa: E402


def cgroup2_mount() -> Path:
    for line in open("/proc/self/mounts"):
        parts = line.split()
        if parts[2] == "cgroup2":
            return Path(parts[1])
    sys.exit("no cgroup2 mount")


def spawn_round(n: int) -> float:
    """ns per fork+exec+exit of /bin/true."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
        os.waitpid(pid, 0)
    return (time.perf_counter_ns() - t0) / n


PER_PROG: dict[str, list[int]] = {}


def bpf_prog_runtime_ns(names: set[str]) -> tuple[int, int]:
    """(sum of run_time_ns, sum of run_cnt) of loaded programs with these names (bpftool, stats on);
    per-program totals accumulate in PER_PROG as [run_time_ns, run_cnt] snapshots."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    t = c = 0
    for p in json.loads(out):
        if p.get("name") in names:
            t += p.get("run_time_ns", 0)
            c += p.get("run_cnt", 0)
            PER_PROG.setdefault(p["name"], []).append((p.get("run_time_ns", 0), p.get("run_cnt", 0)))
    return t, c


TRACKER_PROGS = {"tp_btf_fork", "tp_btf_exec", "tp_btf_exit", "tp_btf_switch", "tp_btf_wakeup",
                 "tp_btf_wakeup_n", "tp_btf_oom", "raw_tp_fork", "raw_tp_exec", "raw_tp_exit", "raw_tp_switch",
                 "raw_tp_wakeup", "raw_tp_wakeup_", "raw_tp_oom"}


def overhead(root: Path, rounds: int, spawns: int, log) -> dict:
    on, off, drain_ns, events = [], [], [], 0
    bpf_ns, bpf_runs, bpf_spawns = 0, 0, 0
    per_prog: dict[str, list[int]] = {}
    stats_ctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_old = stats_ctl.read_text().strip() if stats_ctl.exists() else None
    spawn_round(spawns // 4)  # warm up
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            if mode == "on":
                with Tracker(root) as tr:
                    if stats_old is not None:
                        stats_ctl.write_text("1")
                    PER_PROG.clear()
                    t_before = bpf_prog_runtime_ns(TRACKER_PROGS)
                    on.append(spawn_round(spawns))
                    t_after = bpf_prog_runtime_ns(TRACKER_PROGS)
                    if stats_old is not None:
                        stats_ctl.write_text(stats_old)
                    bpf_ns += t_after[0] - t_before[0]
                    bpf_runs += t_after[1] - t_before[1]
                    bpf_spawns += spawns
                    for name, snaps in PER_PROG.items():
                        if len(snaps) == 2:
                            acc = per_prog.setdefault(name, [0, 0])
                            acc[0] += snaps[1][0] - snaps[0][0]
                            acc[1] += snaps[1][1] - snaps[0][1]
                    t0 = time.perf_counter_ns()
                    evs = tr.poll(0)
                    drain_ns.append((time.perf_counter_ns() - t0) / max(1, len(evs)))
                    events += len(evs)
                    lost = tr.lost_events
            else:
                off.append(spawn_round(spawns))
        log(f"round {r + 1}/{rounds}: on {on[-1]:.0f} ns, off {off[-1]:.0f} ns per spawn")
    return {"overhead_ns_per_spawn": round(bpf_ns / bpf_spawns) if bpf_spawns and stats_old is not None else None,
            "overhead_source": "in-kernel run time of the tracker's programs per traced spawn "
                               "(kernel.bpf_stats_enabled), all hooks incl. sched_switch/wakeup",
            "ns_per_run_by_program": {n: round(t / c) for n, (t, c) in sorted(per_prog.items()) if c},
            "runs_per_spawn_by_program": {n: round(c / bpf_spawns, 2) for n, (t, c) in sorted(per_prog.items())
                                          if bpf_spawns},
            "bpf_prog_runs_per_spawn": round(bpf_runs / bpf_spawns, 1) if bpf_spawns else None,
            "wall_overhead_ns_per_spawn": round(statistics.median(on) - statistics.median(off)),
            "wall_ratio_traced_untraced": round(statistics.median(on) / statistics.median(off), 3),
            "spawn_ns_traced_median": round(statistics.median(on)),
            "spawn_ns_untraced_median": round(statistics.median(off)),
            "events_per_spawn": round(events / (rounds * spawns), 2),
            "consumer_ns_per_event": round(statistics.median(drain_ns)),
            "lost_in_overhead_rounds": lost}


SPAWNER = r"""
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ); os.waitpid(pid, 0); n += 1
print(n)
"""


def throughput(root: Path, load_s: float, log) -> dict:
    with Tracker(root) as tr:
        procs = [subprocess.Popen([sys.executable, "-c", SPAWNER, str(load_s)], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        n_events, t0 = 0, time.monotonic()
        while any(p.poll() is None for p in procs):
            n_events += len(tr.poll(50))
        n_events += len(tr.poll(50))
        elapsed = time.monotonic() - t0
        spawns = sum(int(p.stdout.read() or 0) for p in procs)
        lost = tr.lost_events
    rate = n_events / elapsed
    log(f"throughput: {n_events} events in {elapsed:.2f} s = {rate:.0f}/s, {spawns} spawns, lost {lost}")
    return {"events_per_s_lossless": round(rate) if lost == 0 else None,
            "events_per_s_measured": round(rate), "lost_events_under_load": lost,
            "load_spawns": spawns, "load_s": round(elapsed, 2)}


AGENT = r"""
import os, sys
n = int(sys.argv[1])
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/sleep", ["/bin/sleep", "0.02"])
    os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.readline()
"""


FIRST_ACTION_AGENT = r"""
import subprocess, sys
n, seen_agent = int(sys.argv[1]), 0
for _ in range(n):
    p = subprocess.Popen(["/bin/grep", "^0::", "/proc/self/cgroup"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    p.wait()
    seen_agent += line.endswith("/agent")
print("done", seen_agent, flush=True)
sys.stdin.readline()
"""


def placement(mnt: Path, calls: int, log, config: str = "", agent_src: str = AGENT) -> dict:
    res, _ = run_auto(mnt, calls, log, config, agent_src)
    return res


def run_auto(mnt: Path, calls: int, log, config: str = "", agent_src: str = AGENT) -> tuple[dict, dict]:
    """One daemon run of `calls` automatic-mode calls: (placement summary, raw samples)."""
    from agentcg.client import Client
    tag = f"agentcg-bench-{os.getpid()}"
    root, runtime = mnt / tag, Path("/tmp") / tag
    runtime.mkdir(exist_ok=True)
    sock = runtime / "agentcg.sock"
    cfg = runtime / "agentcg.toml"
    cfg.write_text(config)
    d = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--config", str(cfg), "--cgroup-root", str(root),
                          "--runtime-dir", str(runtime), "--no-require-controllers", "--log-level", "warning"])
    agent = None
    try:
        while not sock.exists():
            if d.poll() is not None:
                raise RuntimeError("agentcgd exited")
            time.sleep(0.02)
        with Client(str(sock)) as c:
            c.request("session.create", name="bench", retry_s=10.0)
            agent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + agent_src, str(calls)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            c.request("session.attach", name="bench", pid=agent.pid)
            deadline = time.monotonic() + 10
            while c.request("status")["hooks"]["bpf"]["automatic_mode"]["agents"].get("bench") != agent.pid:
                if time.monotonic() > deadline:
                    raise RuntimeError("agent not registered")
                time.sleep(0.02)
            agent.stdin.write("go\n")
            agent.stdin.flush()
            done = agent.stdout.readline().split()
            time.sleep(0.5)
            events = [json.loads(line) for line in (runtime / "events.jsonl").read_text().splitlines()]
            autos = [e for e in events if e.get("type") == "call.auto"]
            raw = {"placement_us": [e["placement_us"] for e in autos],
                   "stopped": [bool(e.get("stopped")) for e in autos],
                   "continued_us": [e["continued_us"] for e in autos if e.get("continued_us") is not None],
                   "outside_first_action": int(done[1]) if len(done) > 1 else None,
                   "failed": sum(1 for e in events if e.get("type") == "call.auto.failed")}
            us = sorted(e["placement_us"] for e in events if e.get("type") == "call.auto")
            seen = sorted(e["seen_us"] for e in events if e.get("type") == "call.auto")
            cs = sorted(e.get("call_start_us", 0) for e in events if e.get("type") == "call.auto")
            status = c.request("status")["hooks"]["bpf"]
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        d.kill()
        d.wait()
        subprocess.run(["sh", "-c", f"for c in $(find {root} -depth -type d); do "
                        f"echo 1 > $c/cgroup.kill 2>/dev/null; done; sleep 0.2; "
                        f"find {root} -depth -type d -exec rmdir {{}} \\; 2>/dev/null"], check=False)
        shutil.rmtree(runtime, ignore_errors=True)
    if not us:
        return {"placement_p50_us": None, "placement_p99_us": None, "placement_samples": 0}, raw
    pick = lambda q: round(us[min(len(us) - 1, int(q * len(us)))], 1)  # noqa: E731
    log(f"placement: {len(us)} auto calls, p50 {pick(0.5)} us, p99 {pick(0.99)} us, max {us[-1]:.0f} us")
    seen_p = lambda q: round(seen[min(len(seen) - 1, int(q * len(seen)))], 1)  # noqa: E731
    return {"call_start_p50_us": round(cs[len(cs) // 2], 1) if cs else None,
            "event_seen_p50_us": seen_p(0.5), "event_seen_p99_us": seen_p(0.99), "placement_p50_us": pick(0.5), "placement_p99_us": pick(0.99), "placement_max_us": round(us[-1], 1),
            "placement_samples": len(us), "placement_lost_events": status.get("lost_events")}, raw


def _p(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None


def stop_compare(mnt: Path, rounds: int, calls: int, log) -> dict:
    """Stop until placed on vs off, alternating daemon runs (see the module doc)."""
    acc = {m: {"outside_us": [], "continued_us": [], "placement_us": [], "outside_first_action": 0,
               "calls": 0, "stopped": 0, "failed": 0} for m in ("on", "off")}
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            cfg = f"[bpf]\nstop_until_placed = {'true' if mode == 'on' else 'false'}\n"
            _, raw = run_auto(mnt, calls, log, cfg, FIRST_ACTION_AGENT)
            a = acc[mode]
            a["placement_us"] += raw["placement_us"]
            a["outside_us"] += [0.0 if st else us for us, st in zip(raw["placement_us"], raw["stopped"])]
            a["continued_us"] += raw["continued_us"]
            a["outside_first_action"] += raw["outside_first_action"] or 0
            a["calls"] += calls
            a["stopped"] += sum(raw["stopped"])
            a["failed"] += raw["failed"]
            log(f"stop {mode} round {r + 1}/{rounds}: {raw['outside_first_action']} of {calls} first actions "
                f"outside their call, placement p50 {_p(raw['placement_us'], 0.5)} us")
    out = {}
    for mode, a in acc.items():
        out[f"stop_{mode}"] = {
            "calls": a["calls"], "stopped": a["stopped"], "auto_failed": a["failed"],
            "outside_first_action": a["outside_first_action"],
            "outside_us_p50": _p(a["outside_us"], 0.5), "outside_us_p99": _p(a["outside_us"], 0.99),
            "outside_us_max": _p(a["outside_us"], 1.0),
            "exec_to_continued_us_p50": _p(a["continued_us"], 0.5) if mode == "on" else 0.0,
            "exec_to_continued_us_p99": _p(a["continued_us"], 0.99) if mode == "on" else 0.0,
            "placement_us_p50": _p(a["placement_us"], 0.5), "placement_us_p99": _p(a["placement_us"], 0.99)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved on/off rounds (default 10)")
    ap.add_argument("--spawns", type=int, default=200, help="fork+exec+exit per round (default 200)")
    ap.add_argument("--load-s", type=float, default=3.0, help="seconds of 2-process spawn load (default 3)")
    ap.add_argument("--calls", type=int, default=200, help="automatic-mode calls (default 200)")
    ap.add_argument("--stop-rounds", type=int, default=4, help="alternating stop on/off daemon runs each (default 4)")
    ap.add_argument("--stop-calls", type=int, default=50, help="automatic-mode calls per stop run (default 50)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bpf_tracker.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (BPF and cgroups)")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    mnt = cgroup2_mount()
    root = mnt / f"agentcg-bench-tracker-{os.getpid()}"
    root.mkdir()
    leaf = root / "c-1"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text(str(os.getpid()))  # spawns happen inside the watched subtree
    try:
        res = {}
        res.update(overhead(root, args.rounds, args.spawns, log))
        res.update(throughput(root, args.load_s, log))
    finally:
        (mnt / "cgroup.procs").write_text(str(os.getpid()))
        time.sleep(0.1)
        leaf.rmdir()
        root.rmdir()
    res.update(placement(mnt, args.calls, log))
    res.update(stop_compare(mnt, args.stop_rounds, args.stop_calls, log))
    lb = Libbpf.get()
    res["environment"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "libbpf": lb.version_str,
                          "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                          "python": platform.python_version(), "cgroup2": str(mnt),
                          "rounds": args.rounds, "spawns_per_round": args.spawns,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
