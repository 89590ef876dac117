"""The metrics hook (daemon/metrics.py) without a kernel: label bounding,
the [metrics] table, the series a daemon on a fake cgroup tree exports
(rendered and parsed with prometheus_client), and the Grafana dashboard
naming only exported metrics."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from agentcg.adapters.cgroupfs import CgroupFs
from agentcg.core.config import Config, ConfigError, parse_config
from agentcg.daemon import metrics as metrics_mod
from agentcg.daemon.hooks import Hooks
from agentcg.daemon.metrics import OTHER, CommandLabels, add_metrics_hook, command_class
from agentcg.daemon.handlers import Peer
from agentcg.daemon.service import Daemon

REPO = Path(__file__).resolve().parents[2]
prom_parser = pytest.importorskip("prometheus_client.parser", reason="the metrics extra (prometheus_client)")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- label bounding ------------------------------------------------------------------------
def test_command_labels_stay_within_max_and_overflow_to_other_while_all_are_in_use():
    clock, evicted = Clock(), []
    labels = CommandLabels(2, evicted.append, idle_evict_s=60, clock=clock)
    assert labels.label("pytest") == "pytest"
    assert labels.label("git status") == "git status"
    clock.t = 59
    for i in range(100):                        # a burst of one-off commands
        assert labels.label(f"./build-{i}.sh") == OTHER
    assert len(labels) == 2 and evicted == []
    assert labels.label("pytest") == "pytest"   # the classes in use keep their series


def test_command_labels_evict_the_least_recently_used_once_idle():
    clock, evicted = Clock(), []
    labels = CommandLabels(2, evicted.append, idle_evict_s=60, clock=clock)
    labels.label("pytest")
    clock.t = 10
    labels.label("make")
    clock.t = 20
    labels.label("pytest")                      # make is now the least recently used
    clock.t = 75                                # make idle 65 s, pytest 55 s
    assert labels.label("cargo build") == "cargo build"
    assert evicted == ["make"]
    assert labels.label("npm test") == OTHER    # pytest was used 55 s ago: not idle yet
    assert sorted(labels.seen) == ["cargo build", "pytest"]
    with pytest.raises(ValueError):
        CommandLabels(0)


def test_command_class_normalises_and_bounds_the_label():
    assert command_class(["python", "-m", "pytest", "-q", "tests/x.py"], "t") == "pytest"
    assert command_class(["git", "-C", "repo", "status"], "") == "git status"
    assert command_class([], "cargo") == "cargo"
    assert command_class([], "") == "unnamed"
    assert len(command_class(["/opt/" + "x" * 200], "")) == 40


def test_evicted_command_series_are_removed_from_the_exposition(tmp_path):
    d, m = fake_daemon(tmp_path, "[metrics]\nlisten = \"127.0.0.1:0\"\nmax_commands = 1\n")
    clock = Clock()
    m.commands.clock = clock
    m.commands.idle_evict_s = 60
    run_call(d, "s1", ["pytest"])
    clock.t = 30
    run_call(d, "s1", ["make"])                  # pytest is not idle yet: "other"
    assert counts(m, "agentcg_calls_started_total") == {"pytest": 1, OTHER: 1}
    clock.t = 100
    run_call(d, "s1", ["make"])                  # pytest idle 100 s: make takes its place
    fam = families(m)
    assert counts(m, "agentcg_calls_started_total") == {"make": 1, OTHER: 1}
    assert not [s for s in fam["agentcg_call_duration_seconds"] if s.labels.get("command") == "pytest"]
    assert {s.labels["command"] for s in fam["agentcg_calls_ended"]} == {"make", OTHER}


# -- config -----------------------------------------------------------------------------------
def test_metrics_table_is_off_by_default_and_errors_name_the_field():
    assert Config().metrics.enabled is False and parse_config("").metrics.listen == ""
    cfg = parse_config('[metrics]\nlisten = "[::1]:9464"\nmax_commands = 8\n').metrics
    assert (cfg.host, cfg.port, cfg.max_commands) == ("::1", 9464, 8)
    for text, key in (('listen = "9464"', "metrics.listen"), ('listen = "host.example:1"', "metrics.listen"),
                      ('listen = "127.0.0.1:70000"', "metrics.listen"), ("listen = 9464", "metrics.listen"),
                      ("max_commands = 0", "metrics.max_commands"), ("port = 1", "metrics.port")):
        with pytest.raises(ConfigError) as exc:
            parse_config(f"[metrics]\n{text}\n")
        assert exc.value.key == key, text


def test_without_prometheus_client_the_log_and_status_say_why(monkeypatch, caplog):
    monkeypatch.setattr(metrics_mod, "prom", None)
    hooks = Hooks()
    with caplog.at_level(logging.ERROR, logger="agentcg.daemon.metrics"):
        add_metrics_hook(parse_config('[metrics]\nlisten = "127.0.0.1:9464"\n'), hooks)
    st = hooks.status()["metrics"]
    assert st["state"] == "unavailable" and "prometheus_client is not installed" in st["reason"]
    assert "agentcg[metrics]" in caplog.text and "127.0.0.1:9464" in caplog.text
    off = Hooks()
    add_metrics_hook(Config(), off)
    assert off.hooks == []                       # not configured: nothing at all


# -- a daemon on a fake tree ----------------------------------------------------------------
ROOT = Peer(pid=os.getpid(), uid=0, gid=0, conn=1)


def fake_daemon(tmp_path: Path, text: str = '[metrics]\nlisten = "127.0.0.1:0"\n') -> tuple[Daemon, "metrics_mod.Metrics"]:
    root = tmp_path / "cg"
    root.mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir()
    config = parse_config(text + f'[daemon]\ncgroup_root = "{root}"\nruntime_dir = "{runtime}"\n')
    hooks = Hooks()
    bind = add_metrics_hook(config, hooks)
    d = Daemon(config, CgroupFs(root), hooks)
    d.own_pid = -1        # this test process stands for the tool call's pid
    bind(d)
    return d, hooks.hooks[0]


def request(d: Daemon, op: str, **fields) -> dict:
    r = asyncio.run(d.handle({"v": 1, "id": 1, "op": op, **fields}, ROOT))
    assert r["ok"], r
    return r


def run_call(d: Daemon, session: str, argv: list[str], exit_status: int = 0) -> int:
    if session not in d.sessions:
        request(d, "session.create", name=session)
    n = request(d, "call.start", session=session, pid=os.getpid(), argv=argv, name=argv[0])["call"]
    request(d, "call.end", session=session, call=n, exit_status=exit_status)
    return n


def families(m) -> dict[str, list]:
    return {f.name: f.samples for f in prom_parser.text_string_to_metric_families(m.render().decode())}


def counts(m, sample: str) -> dict[str, float]:
    fam = families(m)[sample.removesuffix("_total")]
    return {s.labels["command"]: s.value for s in fam if s.name == sample}


def test_fake_tree_daemon_exports_session_and_call_series_and_drops_them_at_session_end(tmp_path):
    d, m = fake_daemon(tmp_path)
    run_call(d, "s1", ["pytest", "-q"])
    run_call(d, "s1", ["pytest", "-x"], exit_status=1)
    sdir = d.cgfs.path("s-s1")
    (sdir / "memory.current").write_text("123456\n")
    (sdir / "memory.peak").write_text("999999\n")
    (sdir / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (sdir / "memory.pressure").write_text("some avg10=1.50 avg60=0.00 avg300=0.00 total=3000000\n"
                                          "full avg10=0.50 avg60=0.00 avg300=0.00 total=1000000\n")
    d.emit({"type": "policy.action", "kind": "kill", "knob": "cgroup.kill", "outcome": "done", "uid": 0})
    d.emit({"type": "policy.action", "kind": "set", "knob": "memory.high", "outcome": "failed: EBUSY", "uid": 0})
    fam = families(m)

    def one(name, **labels):
        fam_name = next(f for f in fam if name == f or name.startswith(f + "_"))
        hits = [s.value for s in fam[fam_name] if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(hits) == 1, (name, labels, fam.get(fam_name))
        return hits[0]

    assert one("agentcg_calls_ended_total", command="pytest", result="ok") == 1
    assert one("agentcg_calls_ended_total", command="pytest", result="failed") == 1
    assert one("agentcg_call_duration_seconds_count", command="pytest") == 2
    assert one("agentcg_session_memory_bytes", session="s1") == 123456
    assert one("agentcg_session_memory_peak_bytes", session="s1") == 999999
    assert one("agentcg_session_cpu_seconds_total", session="s1") == 2.5
    assert one("agentcg_session_pressure_stall_seconds_total", session="s1", resource="memory", kind="some") == 3.0
    assert one("agentcg_session_pressure_avg10_ratio", session="s1", resource="memory", kind="full") == 0.005
    assert one("agentcg_session_calls_started_total", session="s1") == 2
    assert one("agentcg_request_duration_seconds_count", op="call.start") == 2
    assert one("agentcg_policy_actions_total", kind="kill", knob="cgroup.kill", outcome="done") == 1
    assert one("agentcg_policy_actions_total", kind="set", knob="memory.high", outcome="failed") == 1
    assert one("agentcg_kills_total", reason="policy") == 1
    request(d, "session.end", name="s1")
    left = [s for samples in families(m).values() for s in samples if "session" in s.labels]
    assert left == []


# -- the dashboard and the metric list ------------------------------------------------------
def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name the daemon can export: a fake tree with a session,
    GPU samples and worker stats from the GPU hook, a BPF tracker's counters."""
    from types import SimpleNamespace

    from fake_pynvml import FakePynvml, proc
    from agentcg.adapters.nvml import Nvml
    from agentcg.daemon.gpu import GpuCoordinator
    d, m = fake_daemon(tmp_path)
    run_call(d, "s1", ["pytest"])
    (d.cgfs.path("s-s1") / "memory.peak").write_text("1\n")
    (d.cgfs.path("s-s1") / "cpu.stat").write_text("usage_usec 1\n")
    (d.cgfs.path("s-s1") / "memory.pressure").write_text("some avg10=0 avg60=0 avg300=0 total=1\n")
    gpu = GpuCoordinator(parse_config("").gpu, Nvml(FakePynvml([{"total": 8 << 30, "used": 1 << 30,
                                                                 "compute": [proc(77, 1 << 20)]}]),
                                                    cgroup_of={77: "/cg/s-s1/agent"}.get))
    gpu.bind(d)
    d.mount = str(tmp_path)
    asyncio.run(gpu.sample())
    gpu.worker_stats = {"gpu_blocks_online": 8, "gpu_blocks_free": 2, "host_blocks": 16, "host_blocks_free": 16,
                        "sessions": {"s1": {"blocks_gpu": 6, "blocks_host": 0}},
                        "swap": {"swap_out_count": 1, "swap_out_bytes": 10, "swap_in_count": 1, "swap_in_bytes": 10}}
    d.hooks.add(gpu)
    d.hooks.add(SimpleNamespace(name="bpf", tracker=SimpleNamespace(events=5, lost_events=0)))
    d.hooks.add(SimpleNamespace(name="policy", ticks=3, state=SimpleNamespace(level=0)))
    d.emit({"type": "gpu.kv", "op": "suspend", "mode": "swap", "uid": 0})
    d.emit({"type": "policy.action", "kind": "freeze", "knob": "cgroup.freeze", "outcome": "done", "uid": 0})
    # a call.end as a host with the memory controller reports it
    d.emit({"type": "call.end", "session": "s1", "call": 99, "name": "make", "uid": 0, "exit_status": 0,
            "stats": {"wall_ns": 10**9, "cpu_usage_usec": 10**6, "memory_peak_bytes": 1 << 30,
                      "stragglers_action": "killed", "memory_events": {"oom_kill": 1}}})
    return {s.name for samples in families(m).values() for s in samples}


def test_grafana_dashboard_and_docs_name_only_exported_metrics(tmp_path):
    names = exported_names(tmp_path)
    assert {"agentcg_session_gpu_memory_bytes", "agentcg_session_kv_blocks", "agentcg_worker_kv_swaps_total",
            "agentcg_bpf_events_lost_total", "agentcg_kv_placements_total"} <= names
    board = json.loads((REPO / "docs" / "grafana-agentcg.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(re.findall(r"\bagentcg_[a-z0-9_]+", expr))
        assert used and used <= names, (expr, used - names)
    doc = (REPO / "docs" / "metrics.md").read_text()
    base = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in names}
    missing = [n for n in sorted(base) if f"`{n}" not in doc]
    assert missing == []


def test_request_ops_outside_the_protocol_share_one_label(tmp_path):
    d, m = fake_daemon(tmp_path)
    for op in ("status", "no.such.op", ["a", "list"], None):
        with pytest.raises(Exception) if op != "status" else contextlib.nullcontext():
            asyncio.run(d.handle({"v": 1, "id": 1, "op": op}, ROOT))
    ops = {s.labels["op"]: s.value for s in families(m)["agentcg_request_duration_seconds"]
           if s.name.endswith("_count")}
    assert ops == {"status": 1, "other": 3}


def test_a_port_in_use_is_reported_and_the_hook_returns(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d, m = fake_daemon(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        asyncio.run(asyncio.wait_for(m.run(d), 5))
    st = d.hooks.status()["metrics"]
    assert st["state"] == "failed" and f"127.0.0.1:{port}" in st["reason"] and st["address"] is None
