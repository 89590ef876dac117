"""Replay recorded agent traces as real processes through agentcgd and compare
memory policies in one run, on the same traces and the same budget.

    PYTHONPATH=. python -m bench.replay --traces ../shared/traces/dev --sessions 16 \
        --speedup 10 --mem-scale 1.0 --budget-mult 1.0 --out bench/results

Policies, each with its own agentcgd under <cgroup2>/agentcg-replay-<pid>/<policy>:
  none      (a) no limits: the parent has no memory.max; its peak is unlimited_peak_mb
  static    (b) every session memory.max = budget / N (container style)
  hint      (c) every tool call memory.high from its command (pytest/pip/... big, else small)
  adaptive  (d) agentcg's ladder (burst borrowing, throttle, reclaim, freeze, kill last)
(b)-(d) run inside a parent whose memory.max is the budget: budget-mult x the
sessions' summed time-averaged memory. Each trace is also run alone (solo,
no limits) for the completion-time ratios. Needs root and cgroup v2 with the
memory, cpu and pids controllers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.replay.plan import SessionPlan, build_plan, load_trace

POLICIES = {"none": "none", "static": "static", "hint": "hint", "adaptive": "adaptive"}
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[replay {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cgroup2_mount() -> Path:
    with open("/proc/self/mounts") as f:
        points = [ln.split()[1] for ln in f if ln.split()[2] == "cgroup2"]
    if "/sys/fs/cgroup" in points:
        return Path("/sys/fs/cgroup")
    if not points:
        raise SystemExit("no cgroup2 mount: the replay needs cgroup v2")
    return Path(points[0])


def controlled_cgroup2(needed: tuple[str, ...] = ("memory", "cpu", "pids")) -> Path:
    """The cgroup2 mount, with `needed` enabled for its children; exits
    with the reason on a host that lacks them (a hybrid host: use the
    kernel lab)."""
    mnt = cgroup2_mount()
    have = set(read(mnt / "cgroup.controllers").split())
    if not set(needed) <= have:
        raise SystemExit(f"cgroup2 at {mnt} lacks the {'/'.join(needed)} controllers (have: {sorted(have)}); "
                         "on a hybrid host run it in the kernel lab (../shared/kernlab/kernlab.sh)")
    for c in needed:
        try:
            (mnt / "cgroup.subtree_control").write_text(f"+{c}")
        except OSError:
            pass
    return mnt


def read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    i = (len(v) - 1) * q
    lo = int(i)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (i - lo)


def choose(args) -> list[tuple[str, dict]]:
    paths = []
    for spec in args.traces:
        p = Path(spec)
        paths += sorted(glob.glob(str(p / "*.json"))) if p.is_dir() else sorted(glob.glob(spec))
    traces = []
    for p in paths:
        t = load_trace(p)
        if args.max_duration_s and t["duration_s"] > args.max_duration_s:
            continue
        if not t.get("tool_calls"):
            continue
        traces.append((Path(p).stem, t))
    if not traces:
        raise SystemExit(f"--traces: no usable trace in {args.traces} (max duration {args.max_duration_s}s)")
    rng = random.Random(args.seed)
    rng.shuffle(traces)
    return [traces[i % len(traces)] for i in range(args.sessions)]


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _kill_and_rmdir(child)
    _kill_and_rmdir(path)


def _kill_and_rmdir(p: Path) -> None:
    for _ in range(200):
        try:
            p.rmdir()
            return
        except OSError:
            try:
                (p / "cgroup.freeze").write_text("0")
                (p / "cgroup.kill").write_text("1")
            except OSError:
                pass
            time.sleep(0.02)


class PolicyRun:
    def __init__(self, args, top: Path, policy: str, plans: list[SessionPlan], prios: list[int],
                 budget: int | None, tag: str):
        self.args, self.policy, self.plans, self.prios, self.budget = args, policy, plans, prios, budget
        self.root = top / tag
        self.dir = Path(args.out) / "replay-runs" / tag
        self.samples: list[tuple[float, int]] = []

    def start_daemon(self) -> subprocess.Popen:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "agentcg.toml"
        policy = (f'rules = [{{ name = "static_session_max", args = {{ sessions = {len(self.plans)} }} }}]'
                  if self.policy == "static" else f'preset = "{POLICIES[self.policy]}"')
        cfg.write_text(f'[daemon]\nrequire_controllers = true\nlog_level = "warning"\n\n[policy]\n{policy}\n')
        runtime = Path("/tmp") / f"agentcg-replay-{os.getpid()}-{self.root.name}"
        runtime.mkdir(parents=True, exist_ok=True)
        self.socket = str(runtime / "agentcg.sock")
        self.events = runtime / "events.jsonl"
        self.runtime = runtime
        d = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--config", str(cfg),
                              "--cgroup-root", str(self.root), "--runtime-dir", str(runtime)],
                             stderr=open(self.dir / "agentcgd.log", "w"))
        # ready = it answers a request (the socket file appears at bind(), before listen())
        from agentcg.client import Client
        deadline = time.monotonic() + 120
        while True:
            if d.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agentcgd for {self.policy} did not start; see {self.dir / 'agentcgd.log'}")
            if os.path.exists(self.socket):
                try:
                    with Client(self.socket, timeout_s=5) as c:
                        c.request("status")
                    return d
                except Exception:
                    pass
            time.sleep(0.02)

    def run(self) -> dict:
        daemon = self.start_daemon()
        daemon_bytes = int(read(self.root / "daemon" / "memory.current") or 0)
        if self.budget is not None:
            (self.root / "memory.max").write_text(str(self.budget + daemon_bytes))
        stop = threading.Event()

        def sampler() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                cur = int(read(self.root / "memory.current") or 0) - int(read(self.root / "daemon" / "memory.current") or 0)
                self.samples.append((time.monotonic() - t0, max(0, cur)))
                stop.wait(self.args.sample_ms / 1000)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        procs = []
        for i, (plan, prio) in enumerate(zip(self.plans, self.prios)):
            pf = self.dir / f"plan-{i}.json"
            pf.write_text(plan.to_json())
            out = self.dir / f"agent-{i}.json"
            for stale in (out, Path(str(out) + ".bursts")):
                stale.unlink(missing_ok=True)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.replay.agent", "--plan", str(pf), "--socket", self.socket,
                 "--session", f"r{i}", "--priority", str(prio), "--speedup", str(self.args.speedup),
                 "--burst-min-bytes", str(int(self.args.burst_min_mb * MB * self.args.mem_scale)),
                 "--cgroup-mount", str(self.args.cgroup_mount),
                 "--out", str(out)], stderr=open(self.dir / f"agent-{i}.log", "w")))
        limit = self.args.timeout_mult * max(p.duration_s for p in self.plans) / self.args.speedup + 60
        deadline = time.monotonic() + limit
        timed_out = 0
        for pr in procs:
            left = deadline - time.monotonic()
            try:
                pr.wait(max(0.1, left))
            except subprocess.TimeoutExpired:
                timed_out += 1
                pr.send_signal(signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        stop.set()
        th.join()
        mev = kv(read(self.root / "memory.events"))
        policy_status = self.policy_status()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        remove_tree(self.root)
        agents = []
        for i, pr in enumerate(procs):
            out = self.dir / f"agent-{i}.json"
            res = json.loads(out.read_text()) if out.exists() else None
            bursts = []
            bp = Path(str(out) + ".bursts")
            if bp.exists():
                for line in bp.read_text().split("\n"):
                    parts = line.split()
                    if len(parts) in (3, 4):
                        bursts.append((int(parts[0]), int(parts[1]), parts[3] if len(parts) == 4 else "burst"))
            err = None
            if res is None:  # why the agent wrote no result: the end of its log
                log_text = (self.dir / f"agent-{i}.log").read_text(errors="replace").strip()
                err = log_text.splitlines()[-1][:300] if log_text else f"exit status {pr.returncode}, no log"
            agents.append({"i": i, "returncode": pr.returncode, "result": res, "bursts": bursts, "error": err,
                           "priority": self.prios[i], "trace": self.plans[i].trace})
        actions = []
        if self.events.exists():
            for line in self.events.read_text().splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("type") == "policy.action":
                    actions.append(ev)
        return {"agents": agents, "memory_events": mev, "samples": self.samples, "actions": actions,
                "timed_out": timed_out, "daemon_bytes": daemon_bytes, "policy_status": policy_status}

    def policy_status(self) -> dict:
        """The daemon's own timings (tick cost; memory.events wake -> first
        action written), from `status` before it stops; {} if not offered."""
        try:
            from agentcg.client import Client
            hooks = Client(self.socket).request("status").get("hooks") or {}
        except Exception:
            return {}
        pol = hooks.get("policy") or {}
        return {k: pol[k] for k in ("tick_us", "signal_to_action_us", "ticks") if k in pol}


def source_commit() -> str | None:
    """The commit of the code that ran (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def agents_alone_peak(plans: list[SessionPlan]) -> int:
    """The most the agents alone hold at once (recorded timelines, all
    sessions starting together, no tool call memory): a budget below this
    leaves the kernel nothing but an agent to take, whatever the policy."""
    times = sorted({t for p in plans for t, _b in p.agent})
    idx = [0] * len(plans)
    cur = [0] * len(plans)
    peak = 0
    for t in times:
        for k, p in enumerate(plans):
            while idx[k] < len(p.agent) and p.agent[idx[k]][0] <= t:
                cur[k] = p.agent[idx[k]][1]
                idx[k] += 1
        peak = max(peak, sum(cur))
    return peak


def reactions_ms(agents: list[dict], actions: list[dict], kind: str,
                 within_ns: int = 2_000_000_000) -> tuple[list[float], int]:
    """For every `kind` event of a call ("mark" or "burst", from the agents'
    .bursts logs): ms to the first policy action on that call's cgroup at or
    after it, within `within_ns`. Returns (the delays, events with no action)."""
    by_target: dict[str, list[int]] = {}
    for ev in actions:
        by_target.setdefault(ev.get("target", ""), []).append(int(ev.get("t_ns", 0)))
    for v in by_target.values():
        v.sort()
    out: list[float] = []
    open_ = 0
    for a in agents:
        for n, t_b, k in a["bursts"]:
            if k != kind:
                continue
            ts = by_target.get(f"s-r{a['i']}/c-{n}", [])
            nxt = next((t for t in ts if t >= t_b), None)
            if nxt is not None and nxt - t_b <= within_ns:
                out.append((nxt - t_b) / 1e6)
            else:
                open_ += 1
    return out, open_


def summarize(policy: str, raw: dict, solo: dict[str, float], budget: int | None) -> dict:
    agents = raw["agents"]
    killed_agents = sum(1 for a in agents if a["returncode"] not in (0, None) and a["returncode"] < 0
                        or a["result"] is None)
    calls = [c for a in agents if a["result"] for c in a["result"]["calls"] if c]
    tc_killed = sum(1 for c in calls if c.get("killed"))
    ratios_hi, ratios_lo = [], []
    top = max(a["priority"] for a in agents)
    for a in agents:
        if not a["result"]:
            continue
        s = solo.get(a["trace"])
        if not s:
            continue
        r = a["result"]["jct_s"] / s
        (ratios_hi if a["priority"] == top and top != min(x["priority"] for x in agents) else ratios_lo).append(r)
    mem = [b for _t, b in raw["samples"]]
    marks, mark_open = reactions_ms(agents, raw["actions"], "mark")
    bursts, burst_open = reactions_ms(agents, raw["actions"], "burst")
    return {
        "policy": policy,
        "agents_killed": killed_agents,
        "agent_returncodes": [a["returncode"] for a in agents],
        "agent_errors": [a["error"] for a in agents if a.get("error")],
        "toolcalls_killed": tc_killed,
        "oom_events": raw["memory_events"].get("oom_kill", 0),
        "oom_raised": raw["memory_events"].get("oom", 0),
        "high_events": raw["memory_events"].get("high", 0),
        "sessions_timed_out": raw["timed_out"],
        "high_jct_vs_solo_p50": pct(ratios_hi, 0.5),
        "high_jct_vs_solo_max": max(ratios_hi) if ratios_hi else None,
        "low_jct_vs_solo_p50": pct(ratios_lo, 0.5),
        "low_jct_vs_solo_max": max(ratios_lo) if ratios_lo else None,
        "high_vs_low_jct_ratio": (pct(ratios_hi, 0.5) / pct(ratios_lo, 0.5)) if ratios_hi and ratios_lo else None,
        "mem_peak_mb": round(max(mem) / MB, 1) if mem else None,
        "mem_mean_mb": round(statistics.fmean(mem) / MB, 1) if mem else None,
        "reaction_p50_ms": pct(marks, 0.5),
        "reaction_p99_ms": pct(marks, 0.99),
        "reaction_max_ms": max(marks) if marks else None,
        "marks": len(marks) + mark_open,
        "marks_with_action": len(marks),
        "reaction_note": "a call about to allocate past its memory.high (the moment the kernel starts throttling "
                         "it unless the policy acts) -> the policy's first action on that call's cgroup "
                         "(written, CLOCK_MONOTONIC) within 2 s; marks the policy left alone are counted in "
                         "marks - marks_with_action",
        "burst_reaction_p50_ms": pct(bursts, 0.5),
        "burst_reaction_p99_ms": pct(bursts, 0.99),
        "bursts": len(bursts) + burst_open,
        "bursts_with_action": len(bursts),
        "burst_note": "burst start (a call's recorded profile climbs by burst_min_mb within a recorded second) "
                      "-> first policy action on that call's cgroup within 2 s (a burst that stays within its "
                      "memory.high needs none)",
        "daemon_signal_to_action_us": (raw.get("policy_status") or {}).get("signal_to_action_us"),
        "daemon_tick_us": (raw.get("policy_status") or {}).get("tick_us"),
        "policy_actions": len(raw["actions"]),
        "action_kinds": {k: sum(1 for e in raw["actions"] if e.get("kind") == k) for k in ("set", "freeze", "thaw", "kill")},
        # each kill the policy wrote, with its reason (the kernel's own OOM kills are oom_events)
        "policy_kills": [e.get("line", "") for e in raw["actions"] if e.get("kind") == "kill"],
        "tool_calls": len(calls),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", default=["../shared/traces/dev"],
                    help="trace files, globs or directories (default %(default)s)")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions N (default %(default)s)")
    ap.add_argument("--priorities", default="8,2",
                    help="session priorities, cycled over the sessions (default %(default)s: half high, half low)")
    ap.add_argument("--speedup", type=float, default=10.0, help="divide recorded time by this (default %(default)s)")
    ap.add_argument("--mem-scale", type=float, default=1.0, help="multiply recorded memory by this")
    ap.add_argument("--budget-mult", type=float, default=1.0,
                    help="parent memory.max = this x the sessions' summed average memory (default %(default)s)")
    ap.add_argument("--max-duration-s", type=float, default=0,
                    help="skip traces longer than this many recorded seconds (0 = no limit)")
    ap.add_argument("--policies", default="none,static,hint,adaptive")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--burst-min-mb", type=float, default=16.0,
                    help="a call growing by at least this much (recorded MB) within a recorded second "
                         "is a burst (default %(default)s)")
    ap.add_argument("--cgroup-mount", default="",
                    help="cgroup2 mount the calls read their memory.high from (default: the one found)")
    ap.add_argument("--sample-ms", type=float, default=20.0)
    ap.add_argument("--timeout-mult", type=float, default=4.0)
    ap.add_argument("--out", default="bench/results", help="results directory (default %(default)s)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the replay needs root (it creates cgroups)")
    mnt = controlled_cgroup2()
    args.cgroup_mount = args.cgroup_mount or str(mnt)
    chosen = choose(args)
    plans = [build_plan(t, args.mem_scale, name) for name, t in chosen]
    prios = [int(x) for x in args.priorities.split(",")]
    prios = [prios[i % len(prios)] for i in range(args.sessions)]
    avg_sum = sum(p.avg_bytes for p in plans)
    budget = int(avg_sum * args.budget_mult)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"--policies: unknown policy {p!r} (known: {', '.join(POLICIES)})")
    top = mnt / f"agentcg-replay-{os.getpid()}"
    top.mkdir()
    (top / "cgroup.subtree_control").write_text("+memory +cpu +pids")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{args.sessions} sessions from {len({p.trace for p in plans})} traces; summed average "
        f"{avg_sum / MB:.0f} MB -> budget {budget / MB:.0f} MB; speed-up {args.speedup}")
    solo: dict[str, float] = {}
    results = []
    try:
        for name in sorted({p.trace for p in plans}):
            plan = next(p for p in plans if p.trace == name)
            log(f"solo {name} ({plan.duration_s / args.speedup:.1f} s)")
            raw = PolicyRun(args, top, "none", [plan], [prios[0]], None, f"solo-{len(solo)}").run()
            res = raw["agents"][0]["result"]
            solo[name] = res["jct_s"] if res else None
        raws = {}
        for pol in policies:
            log(f"policy {pol}")
            raw = PolicyRun(args, top, pol, plans, prios, None if pol == "none" else budget, pol).run()
            raws[pol] = raw
            s = summarize(pol, raw, solo, budget)
            log(json.dumps(s))
            results.append(s)
    finally:
        remove_tree(top)
    unlimited = next((r["mem_peak_mb"] for r in results if r["policy"] == "none"), None)
    params = {"sessions": args.sessions, "priorities": args.priorities, "speedup": args.speedup,
              "mem_scale": args.mem_scale, "budget_mult": args.budget_mult, "seed": args.seed,
              "traces": sorted({p.trace for p in plans}), "max_duration_s": args.max_duration_s,
              "budget_mb": round(budget / MB, 1), "unlimited_peak_mb": unlimited,
              "summed_avg_mb": round(avg_sum / MB, 1), "summed_peak_mb": round(sum(p.peak_bytes for p in plans) / MB, 1),
              "agents_alone_peak_mb": round(agents_alone_peak(plans) / MB, 1),
              "burst_min_mb": args.burst_min_mb,
              "solo_jct_s": solo, "host": os.uname().nodename, "kernel": os.uname().release,
              "commit": source_commit()}
    for r in results:
        r.update({"budget_mb": params["budget_mb"], "unlimited_peak_mb": unlimited, "params": params})
    (out / "replay.json").write_text(json.dumps({"params": params, "policies": results}, indent=1))
    (out / "replay-series.json").write_text(json.dumps({p: r["samples"][::5] for p, r in raws.items()}))
    from bench.replay.report import plots, table
    (out / "replay.md").write_text(table(params, results))
    if not args.no_plots:
        plots(out, raws, results, params)
    print(table(params, results))
    return 0
