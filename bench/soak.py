#!/usr/bin/env python3
"""Soak: many sessions making tool calls at a steady rate against one agentcgd.

`--sessions` agents, each with its own connection (agentcg.client.Client) and
session, make tool calls at an aggregate `--rate` per second for `--duration`
seconds. Each call runs `/bin/true`, or, every fifth call, `sh -c 'exit N'`
with N its own number mod 100, and the exit status coming back from call.end
must be N (the accounting path is checked, not just the round trip). A
sampler reads the daemon's RSS (VmRSS) and open descriptor count
(/proc/PID/fd) every `--sample` seconds.

Per call two times are kept: the hot-path overhead (the round trips of
call.start and call.end, i.e. what the daemon adds on top of running the
command) and the whole call. The result gives, per window (one minute by
default), calls, p50/p99 of both, and the daemon's RSS and fds; and first vs
last window: RSS growth, fds, and the p99 ratio last/first. The first
`--warmup` seconds (sessions opening, BPF programs loading) are left out of
the first window; descriptors are compared by their minimum in a window (the
idle baseline: a call in flight holds a few more for a moment). Errors (any
exception, a wrong exit status, a call cgroup left behind) are counted with
the first few messages.

The script starts its own agentcgd on a temporary cgroup root below the host's
cgroup2 mount (`require_controllers = false` where the mount has no memory/cpu
controllers: real placement, no limits) and removes it at the end.

    sudo .venv/bin/python bench/soak.py --sessions 64 --rate 20 --duration 600
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._daemon import BenchDaemon  # noqa: E402
from bench.toolcall_overhead import cgroup_mode, percentile_us, remove_tree  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "reliability" / "soak.json"
TRUE = shutil.which("true") or "/bin/true"
HOT_OPS = ("call.start", "call.end")
MAX_ERROR_TEXTS = 20


@dataclasses.dataclass(frozen=True)
class SoakSpec:
    sessions: int = 64
    rate_per_s: float = 20.0
    duration_s: float = 600.0
    window_s: float = 60.0
    sample_s: float = 2.0
    warmup_s: float = 10.0   # left out of the first window: sessions open, BPF loads


@dataclasses.dataclass
class CallSample:
    t_s: float            # since the soak began, at the call's start
    overhead_ns: int      # call.start + call.end round trips
    call_ns: int          # the whole tool call, command included


class Recorder:
    """Calls and errors from every session thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[CallSample] = []
        self.errors = 0
        self.error_texts: list[str] = []

    def call(self, sample: CallSample) -> None:
        with self.lock:
            self.calls.append(sample)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_texts) < MAX_ERROR_TEXTS:
                self.error_texts.append(text)


# --- the daemon ----------------------------------------------------------------

class SoakDaemon(BenchDaemon):
    """An agentcgd of our own on `root`, its runtime directory under `workdir`."""

    def __init__(self, root: Path, workdir: Path) -> None:
        super().__init__(root, workdir, log_level="warning", start_timeout_s=60)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """(t_s, rss_bytes, fds) of `pid` every `every_s` until stopped."""

    def __init__(self, pid: int, t0: float, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.every_s = pid, t0, every_s
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self.t0, rss_bytes(self.pid), open_fds(self.pid)))

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            self.sample()


# --- the agents ----------------------------------------------------------------

def _timed_requests(client: Any, spent_ns: list[int]) -> None:
    """Make `client` add the round-trip time of each hot-path request to spent_ns[0]."""
    plain = client.request

    def timed(op: str, **fields: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return plain(op, **fields)
        finally:
            if op in HOT_OPS:
                spent_ns[0] += time.perf_counter_ns() - t0

    client.request = timed


def one_call(session: Any, n: int) -> int:
    """Run the n-th call of a session; the exit status it must report."""
    if n % 5 == 0:
        want = n % 100
        argv = ["sh", "-c", f"exit {want}"]
    else:
        want, argv = 0, [TRUE]
    with session.tool_call(os.path.basename(argv[0])) as call:
        result = call.run(argv)
    if result.exit_status != want or result.error:
        raise RuntimeError(f"call {n}: exit status {result.exit_status}, wanted {want} ({result.error})")
    if not result.stats.get("wall_ns"):
        raise RuntimeError(f"call {n}: no wall_ns in stats {result.stats}")
    return want


def agent(socket_path: str, name: str, spec: SoakSpec, start_at: float, t0: float, rec: Recorder,
          stop: threading.Event) -> None:
    """One session: a call every sessions/rate seconds from `start_at`. A late
    call is not made up for (the schedule skips ahead), so the measured rate is
    what the machine sustained."""
    from agentcg.client import Client

    client = Client(socket_path=socket_path)
    spent_ns = [0]
    _timed_requests(client, spent_ns)
    period_s = spec.sessions / spec.rate_per_s
    try:
        session = client.session(name)
    except Exception as exc:  # counted, not raised: the soak goes on
        rec.error(f"{name}: session.create: {exc!r}")
        client.close()
        return
    due = start_at
    n = 0
    while not stop.is_set():
        wait_s = due - time.monotonic()
        if wait_s > 0 and stop.wait(wait_s):
            break
        n += 1
        spent_ns[0] = 0
        t_start = time.monotonic()
        c0 = time.perf_counter_ns()
        try:
            one_call(session, n)
            rec.call(CallSample(t_start - t0, spent_ns[0], time.perf_counter_ns() - c0))
        except Exception as exc:
            rec.error(f"{name}: {exc!r}")
        due += period_s
        if due < time.monotonic():
            due += period_s * int((time.monotonic() - due) / period_s + 1)
    try:
        session.end()
    except Exception as exc:
        rec.error(f"{name}: session.end: {exc!r}")
    client.close()


# --- summary ---------------------------------------------------------------------

def _window(calls: list[CallSample], samples: list[tuple[float, int, int]], lo_s: float, hi_s: float) -> dict:
    inside = [c for c in calls if lo_s <= c.t_s < hi_s]
    mem = [s for s in samples if lo_s <= s[0] < hi_s]
    out: dict[str, Any] = {"t0_s": round(lo_s, 1), "calls": len(inside)}
    if inside:
        over = [c.overhead_ns for c in inside]
        whole = [c.call_ns for c in inside]
        out.update(overhead_p50_us=percentile_us(over, 50), overhead_p99_us=percentile_us(over, 99),
                   call_p50_us=percentile_us(whole, 50), call_p99_us=percentile_us(whole, 99))
    if mem:
        out.update(rss_max_bytes=max(s[1] for s in mem), rss_last_bytes=mem[-1][1],
                   fds_min=min(s[2] for s in mem), fds_max=max(s[2] for s in mem))
    return out


def summarise(spec: SoakSpec, rec: Recorder, samples: list[tuple[float, int, int]], elapsed_s: float) -> dict:
    n_windows = max(1, int(round(elapsed_s / spec.window_s)))
    windows = [_window(rec.calls, samples, i * spec.window_s if i else min(spec.warmup_s, spec.window_s / 2),
                       (i + 1) * spec.window_s if i < n_windows - 1 else elapsed_s + 1)
               for i in range(n_windows)]
    first, last = windows[0], windows[-1]
    result: dict[str, Any] = {
        "sessions": spec.sessions, "target_rate_per_s": spec.rate_per_s,
        "duration_s": round(elapsed_s, 1), "window_s": spec.window_s, "warmup_s": spec.warmup_s,
        "calls": len(rec.calls), "rate_per_s": round(len(rec.calls) / elapsed_s, 2),
        "errors": rec.errors, "error_texts": rec.error_texts,
        "rss_first_bytes": first.get("rss_max_bytes"), "rss_last_bytes": last.get("rss_max_bytes"),
        "fds_first": first.get("fds_min"), "fds_last": last.get("fds_min"),
        "fds_first_max": first.get("fds_max"), "fds_last_max": last.get("fds_max"),
        "windows": windows,
    }
    if result["rss_first_bytes"] and result["rss_last_bytes"]:
        result["rss_growth_bytes"] = result["rss_last_bytes"] - result["rss_first_bytes"]
    if first.get("overhead_p99_us") and last.get("overhead_p99_us"):
        result["overhead_p99_last_over_first"] = round(last["overhead_p99_us"] / first["overhead_p99_us"], 3)
        result["overhead_p50_last_over_first"] = round(last["overhead_p50_us"] / first["overhead_p50_us"], 3)
    return result


def leftover_calls(root: Path) -> list[str]:
    """Call cgroups (c-N) still below the daemon's root."""
    return sorted(str(p.relative_to(root)) for p in root.glob("s-*/c-*"))


def soak(spec: SoakSpec, socket_path: str, daemon_pid: int) -> dict:
    """Run the soak against a running daemon; the summary (see module doc)."""
    rec = Recorder()
    stop = threading.Event()
    t0 = time.monotonic()
    sampler = Sampler(daemon_pid, t0, spec.sample_s)
    period_s = spec.sessions / spec.rate_per_s
    threads = [threading.Thread(target=agent, daemon=True,
                                args=(socket_path, f"soak-{i}", spec, t0 + period_s * i / spec.sessions,
                                      t0, rec, stop))
               for i in range(spec.sessions)]
    sampler.sample()
    sampler.start()
    for t in threads:
        t.start()
    stop.wait(spec.duration_s)
    sampler.halt.set()   # before the sessions end: the last window is steady state too
    sampler.join()
    stop.set()
    elapsed_s = time.monotonic() - t0
    for t in threads:
        t.join(60)
        if t.is_alive():
            rec.error(f"{t.name}: still running 60 s after the end")
    sampler.sample()   # after every session ended
    result = summarise(spec, rec, sampler.samples[:-1], elapsed_s)
    _, result["rss_after_bytes"], result["fds_after"] = sampler.samples[-1]
    result["fds_before"] = sampler.samples[0][2]
    return result


def environment() -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    mode, mount = cgroup_mode()
    return {"commit": commit + ("-dirty" if dirty else ""), "host": platform.node(),
            "kernel": platform.release(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "cgroup_mode": mode, "cgroup_root": str(mount), "loadavg_start": os.getloadavg()}


def run(spec: SoakSpec) -> dict:
    mode, mount = cgroup_mode()
    if mount is None:
        sys.exit("no cgroup2 mount on this host")
    if os.geteuid() != 0:
        sys.exit("needs root (creates cgroups)")
    env = environment()
    root = mount / f"agentcg-soak-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="agentcg-soak-"))
    daemon = SoakDaemon(root, workdir)
    try:
        result = soak(spec, str(daemon.socket), daemon.pid)
        left = leftover_calls(root)
        if left:
            result["errors"] += len(left)
            result["error_texts"].append(f"call cgroups left behind: {left[:10]}")
        result["daemon_alive"] = daemon.proc.poll() is None
    finally:
        daemon.stop()
        remove_tree(root)
        shutil.rmtree(workdir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    result["environment"] = env
    return result


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Many sessions x tool calls per second against one agentcgd: errors, the daemon's "
                    "RSS and fds, and hot-path latency per window, first vs last.",
        epilog="example: sudo .venv/bin/python bench/soak.py --sessions 64 --rate 20 --duration 600")
    ap.add_argument("--sessions", type=int, default=64, help="concurrent sessions, one connection each (64)")
    ap.add_argument("--rate", type=float, default=20.0, help="target tool calls per second, all sessions (20)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (600)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds per reported window (60)")
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between RSS/fd samples (2)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds left out of the first window (10)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file ({DEFAULT_OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.rate <= 0 or args.duration < args.window or args.window <= 0:
        ap.error("need --sessions >= 1, --rate > 0, --window > 0 and --duration >= --window")
    spec = SoakSpec(args.sessions, args.rate, args.duration, args.window, args.sample, args.warmup)
    # SIGTERM unwinds like Ctrl-C, so the daemon and its cgroups are removed
    signal.signal(signal.SIGTERM, _interrupt)
    result = run(spec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['calls']} calls in {result['duration_s']} s ({result['rate_per_s']}/s of "
          f"{spec.rate_per_s} wanted), {result['errors']} errors; RSS {result['rss_first_bytes']} -> "
          f"{result['rss_last_bytes']} B, fds {result['fds_first']} -> {result['fds_last']}; overhead p99 "
          f"last/first {result.get('overhead_p99_last_over_first')}; written to {args.out}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
