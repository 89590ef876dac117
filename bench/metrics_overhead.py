#!/usr/bin/env python3
"""What the Prometheus endpoint costs a tool call: two agentcgd side by side,
one with `[metrics] listen` set and scraped, one without.

Each daemon holds `--sessions` idle sessions (what a scrape reads) and one
session that runs /bin/true as tool calls (call.start, call.started,
call.end through the stdlib client). The two run in interleaved rounds
(`--round-size` calls of one, then the other, order swapped every round) so
that they share the machine's noise, while a thread scrapes the metrics
daemon every `--scrape-interval-s` over HTTP. Written to
bench/results/metrics_overhead.json:

- per daemon: tool call round trip p50/p99/mean (client side);
- the metrics daemon's own view of its hot path (agentcg_request_duration_seconds
  for call.start / call.end: mean from _sum/_count);
- a scrape's time seen by the scraper (p50/p99) and the daemon's render time;
- the policy loop's tick time of each daemon (`agentcg status`, hooks.policy).

    sudo python bench/metrics_overhead.py --calls 2000
"""
from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _daemon import BenchDaemon, has_limit_controllers  # noqa: E402
from toolcall_overhead import TRUE, cgroup_mode, environment, percentile_us, remove_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "metrics_overhead.json"


class Agentcgd(BenchDaemon):
    """One daemon of our own on `root`; `metrics`: serve the endpoint on a free port."""

    def __init__(self, name: str, root: Path, workdir: Path, *, metrics: bool, require_controllers: bool):
        from agentcg.client import Client

        super().__init__(root, workdir, name=name, require_controllers=require_controllers,
                         extra_config='[metrics]\nlisten = "127.0.0.1:0"\n' if metrics else "",
                         start_timeout_s=30)
        self.client = Client(socket_path=str(self.socket))
        self.url = None
        if metrics:
            while True:
                m = self.client.status()["hooks"].get("metrics", {})
                if m.get("state") == "serving":
                    self.url = f"http://{m['address']}/metrics"
                    break
                if m.get("state") != "starting" or time.monotonic() > self.deadline:
                    raise RuntimeError(f"no metrics endpoint: {m}")
                time.sleep(0.05)
        self.session = self.client.session("bench")

    def call(self) -> None:
        with self.session.tool_call("true") as call:
            result = call.run([TRUE])
        if result.exit_status != 0:
            raise RuntimeError(f"tool call exited {result.exit_status}")

    def close(self) -> None:
        try:
            for s in self.client.sessions():
                self.client.request("session.end", name=s["name"], force=True)
        finally:
            self.client.close()
            self.stop()


class Scraper(threading.Thread):
    def __init__(self, url: str, interval_s: float):
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.samples_ns: list[int] = []
        self.bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            t0 = time.perf_counter_ns()
            with urllib.request.urlopen(self.url, timeout=10) as r:
                body = r.read()
            self.samples_ns.append(time.perf_counter_ns() - t0)
            self.bytes = len(body)


def hot_path_means_us(text: str) -> dict[str, float]:
    """call.start / call.started / call.end mean time in the daemon from its own histogram."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "agentcg_request_duration_seconds":
            continue
        sums = {s.labels["op"]: s.value for s in fam.samples if s.name.endswith("_sum")}
        counts = {s.labels["op"]: s.value for s in fam.samples if s.name.endswith("_count")}
        for op in ("call.start", "call.started", "call.end"):
            if counts.get(op):
                out[f"{op.replace('.', '_')}_mean_us"] = round(sums[op] / counts[op] * 1e6, 1)
    return out


def summary(samples_ns: list[int]) -> dict[str, float]:
    return {"p50_us": percentile_us(samples_ns, 50), "p99_us": percentile_us(samples_ns, 99),
            "mean_us": round(sum(samples_ns) / len(samples_ns) / 1000, 1)}


def run(args: argparse.Namespace) -> dict:
    mode, mount = cgroup_mode()
    if mount is None:
        sys.exit("no cgroup2 mount on this host")
    base = mount / f"agentcg-metrics-bench-{os.getpid()}"
    base.mkdir()
    workdir = Path(tempfile.mkdtemp(prefix="agentcg-metrics-bench-"))
    has_controllers = has_limit_controllers(mount)
    daemons: list[Agentcgd] = []
    scraper = None
    try:
        on = Agentcgd("on", base / "on", workdir, metrics=True, require_controllers=has_controllers)
        daemons.append(on)
        off = Agentcgd("off", base / "off", workdir, metrics=False, require_controllers=has_controllers)
        daemons.append(off)
        for d in daemons:
            for i in range(args.sessions):
                d.client.session(f"idle-{i}")
            for _ in range(args.warmup):
                d.call()
        samples: dict[str, list[int]] = {"on": [], "off": []}
        scraper = Scraper(on.url, args.scrape_interval_s)
        scraper.start()
        rounds = -(-args.calls // args.round_size)
        for r in range(rounds):
            n = min(args.round_size, args.calls - r * args.round_size)
            for d in (daemons if r % 2 == 0 else daemons[::-1]):
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    d.call()
                    samples[d.name].append(time.perf_counter_ns() - t0)
        scraper.stop.set()
        scraper.join()
        with urllib.request.urlopen(on.url, timeout=10) as resp:
            text = resp.read().decode()
        status = {d.name: d.client.status()["hooks"] for d in daemons}
    finally:
        if scraper is not None:
            scraper.stop.set()
        for d in daemons:
            d.close()
        remove_tree(base)
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict = {"calls": args.calls, "warmup": args.warmup, "round_size": args.round_size,
                    "idle_sessions": args.sessions, "scrape_interval_s": args.scrape_interval_s,
                    "metrics_on": summary(samples["on"]), "metrics_off": summary(samples["off"])}
    result["added_p50_us"] = round(result["metrics_on"]["p50_us"] - result["metrics_off"]["p50_us"], 1)
    result["added_p99_us"] = round(result["metrics_on"]["p99_us"] - result["metrics_off"]["p99_us"], 1)
    result["added_mean_us"] = round(result["metrics_on"]["mean_us"] - result["metrics_off"]["mean_us"], 1)
    result["daemon_hot_path_metrics_on"] = hot_path_means_us(text)
    result["scrapes"] = len(scraper.samples_ns)
    result["scrape"] = summary(scraper.samples_ns) if scraper.samples_ns else {}
    result["scrape_bytes"] = scraper.bytes
    result["scrape_render_ms_p50"] = status["on"]["metrics"]["scrape_ms_p50"]
    result["policy_tick_us"] = {name: h["policy"]["tick_us"] for name, h in status.items()}
    result["environment"] = environment(mode, mount)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tool call cost with the metrics endpoint on and scraped vs off, "
                                            "two daemons side by side in interleaved rounds.",
                                epilog="example: sudo python bench/metrics_overhead.py --calls 2000")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per daemon (default 1000)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per daemon first (default 20)")
    p.add_argument("--round-size", type=int, default=20, help="calls of one daemon before the other's (default 20)")
    p.add_argument("--sessions", type=int, default=20, help="idle sessions per daemon, read by each scrape (default 20)")
    p.add_argument("--scrape-interval-s", type=float, default=0.5,
                   help="seconds between scrapes (default 0.5; Prometheus' default is 15)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default %(default)s)")
    args = p.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
