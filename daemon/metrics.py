"""Prometheus metrics of agentcgd: `GET http://<[metrics] listen>/metrics`.

A hook (daemon/hooks.py), registered by `add_metrics_hook` in
daemon/app.py:build() when `[metrics] listen` is set. Three sources:

- events, counted as they happen: a session's and a command class's tool
  calls started (on_call_start) and ended (the `call.end` event, which
  carries the call's stats: duration, CPU, peak memory, stragglers killed),
  policy actions and kills (`policy.action`, `gpu.kill`), KV placements
  (`gpu.kv`). The daemon's events reach the hook as a subscriber that counts
  in place (no queue, no task);
- the request path: each request's time in the daemon, from the decoded
  request to its reply (call.start -> reply, call.end -> reply), by op;
- the daemon's state, read only when scraped (`Collector`): every live
  session's memory, CPU and PSI from its cgroup files, its GPU memory and
  KV blocks from the GPU hook's last sample, the BPF tracker's lost events,
  the worker's KV pools and swaps. Nothing is read between scrapes.

Label cardinality is bounded: series of a session exist while it lives
(the collector only yields live sessions, and its counters are dropped at
session end); command classes (`core/durations.py` `normalise`: `pytest`,
`git status`) are an LRU of `[metrics] max_commands` (`CommandLabels`);
op, kind, reason and result take a fixed set of values.

The endpoint is served on the daemon's event loop (a scrape reads the
daemon's records without a lock, between two requests). Without the
`metrics` extra (prometheus_client) the daemon logs why there is no
endpoint, shows it in `agentcg status`, and runs on. docs/metrics.md lists
every metric.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Callable, Iterator

from agentcg import protocol as p
from agentcg.adapters.cgroupview import parse_flat_keyed, parse_int
from agentcg.adapters.procfs import proc_status
from agentcg.adapters.psi import read_psi
from agentcg.core.durations import normalise

try:
    import prometheus_client as prom
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:   # the `metrics` extra is not installed: add_metrics_hook says so
    prom = None

log = logging.getLogger("agentcg.daemon.metrics")

OTHER = "other"            # command classes beyond the LRU's room, ops outside the protocol's
UNNAMED = "unnamed"        # a call with neither argv nor name
COMMAND_MAX_CHARS = 40
IDLE_EVICT_S = 600.0       # a command class unused this long may give its slot to a new one
RESULTS = ("ok", "failed", "unknown")
KILL_REASONS = ("policy", "straggler", "gpu", "oom")
OUTCOMES = ("done", "dry-run", "gone", "failed")
PSI_RESOURCES = ("memory", "cpu", "io")
REQUEST_BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0, 5.0)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
MEMORY_BUCKETS_BYTES = tuple(float(1 << s) for s in range(20, 37, 2))   # 1 MiB .. 64 GiB, x4
HTTP_HEAD_MAX_BYTES = 8192
HTTP_READ_TIMEOUT_S = 5.0


def command_class(argv: list[str] | None, name: str) -> str:
    """A call's command class: its normalised argv, else its normalised name."""
    cmd = normalise(argv) if argv else ""
    if not cmd and name:
        cmd = normalise(name) or name.strip()
    return (cmd or UNNAMED)[:COMMAND_MAX_CHARS]


class CommandLabels:
    """Command class -> label value, at most `max_commands` of them (plus
    "other"). A new class takes the slot of the least recently used one if
    that one has been idle for `idle_evict_s`; `on_evict(label)` then drops
    its series. Otherwise it is counted as "other": a burst of one-off
    commands neither grows the series nor pushes out the classes in use."""

    def __init__(self, max_commands: int, on_evict: Callable[[str], None] | None = None, *,
                 idle_evict_s: float = IDLE_EVICT_S, clock: Callable[[], float] = time.monotonic):
        if max_commands < 1:
            raise ValueError(f"max_commands: {max_commands} is not at least 1")
        self.max_commands = max_commands
        self.on_evict = on_evict or (lambda label: None)
        self.idle_evict_s = idle_evict_s
        self.clock = clock
        self.seen: collections.OrderedDict[str, float] = collections.OrderedDict()   # oldest first

    def label(self, command: str) -> str:
        now = self.clock()
        if command == OTHER:
            return OTHER
        if command in self.seen:
            self.seen.move_to_end(command)
            self.seen[command] = now
            return command
        if len(self.seen) >= self.max_commands:
            oldest, last_s = next(iter(self.seen.items()))
            if now - last_s < self.idle_evict_s:
                return OTHER
            del self.seen[oldest]
            self.on_evict(oldest)
        self.seen[command] = now
        return command

    def __len__(self) -> int:
        return len(self.seen)


class _EventSink:
    """Stands in for a subscriber's queue in the event log's subscribers: each event
    is counted at once, where it is emitted."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def put_nowait(self, event: dict[str, Any]) -> None:
        try:
            self.fn(event)
        except Exception:   # a metric must never fail an emit
            log.exception("metrics: event %s not counted", event.get("type"))


def _read(cgfs: Any, rel: str, name: str) -> str | None:
    try:
        return cgfs.read(rel, name)
    except OSError:
        return None


def _procs(cgfs: Any, rel: str) -> list[int]:
    try:
        return cgfs.procs(rel)
    except OSError:
        return []


def rss_bytes(pids: list[int]) -> int:
    """Summed VmRSS of `pids` (those that exited meanwhile count 0)."""
    total = 0
    for pid in pids:
        st = proc_status(pid) or {}
        parts = st.get("VmRSS", "").split()
        if parts and parts[0].isdigit():
            total += int(parts[0]) * 1024
    return total


class Collector:
    """The series read from the daemon's state at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def describe(self) -> list:
        return []   # series come and go with sessions: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        d = self.m.daemon
        if d is None:
            return
        sessions = list(d.sessions.values())
        yield GaugeMetricFamily("agentcg_sessions", "Sessions the daemon holds.", value=len(sessions))
        yield from self._sessions(d, sessions)
        yield from self._hooks(d, sessions)

    def _sessions(self, d: Any, sessions: list[Any]) -> Iterator[Any]:
        L = ["session"]
        running = GaugeMetricFamily("agentcg_session_running_calls", "Tool calls running in the session.", labels=L)
        started = CounterMetricFamily("agentcg_session_calls_started", "Tool calls started in the session.", labels=L)
        ended = CounterMetricFamily("agentcg_session_calls_ended", "Tool calls ended in the session.", labels=L)
        mem = GaugeMetricFamily("agentcg_session_memory_bytes",
                                "memory.current of the session cgroup (where the memory controller is not "
                                "enabled: the summed RSS of its processes).", labels=L)
        peak = GaugeMetricFamily("agentcg_session_memory_peak_bytes", "memory.peak of the session cgroup.", labels=L)
        cpu = CounterMetricFamily("agentcg_session_cpu_seconds", "CPU time of the session cgroup (cpu.stat "
                                  "usage_usec), its agent and tool calls.", labels=L)
        LP = ["session", "resource", "kind"]
        stall = CounterMetricFamily("agentcg_session_pressure_stall_seconds",
                                    "PSI stall time of the session cgroup (*.pressure total).", labels=LP)
        avg10 = GaugeMetricFamily("agentcg_session_pressure_avg10_ratio",
                                  "PSI share of the last 10 s stalled (*.pressure avg10 / 100).", labels=LP)
        cgfs = d.cgfs
        for s in sessions:
            rel, v = s.rel, [s.name]
            running.add_metric(v, len(s.calls))
            counts = self.m.session_calls.get(s.name, (0, 0))
            started.add_metric(v, counts[0])
            ended.add_metric(v, counts[1])
            current = parse_int(_read(cgfs, rel, "memory.current"))
            if current is None:
                leaves = [f"{rel}/agent"] + [c.rel for c in list(s.calls.values())]
                current = rss_bytes([pid for leaf in leaves for pid in _procs(cgfs, leaf)])
            mem.add_metric(v, current)
            top = parse_int(_read(cgfs, rel, "memory.peak"))
            if top is not None:
                peak.add_metric(v, top)
            usage = parse_flat_keyed(_read(cgfs, rel, "cpu.stat")).get("usage_usec")
            if usage is not None:
                cpu.add_metric(v, usage / 1e6)
            for res in PSI_RESOURCES:
                for kind, vals in read_psi(_read(cgfs, rel, f"{res}.pressure")).items():
                    if kind in ("some", "full"):
                        stall.add_metric([s.name, res, kind], vals.get("total", 0.0) / 1e6)
                        avg10.add_metric([s.name, res, kind], vals.get("avg10", 0.0) / 100)
        yield from (running, started, ended, mem, peak, cpu, stall, avg10)

    def _hooks(self, d: Any, sessions: list[Any]) -> Iterator[Any]:
        hooks = {getattr(h, "name", ""): h for h in d.hooks.hooks}
        policy, bpf, gpu = hooks.get("policy"), hooks.get("bpf"), hooks.get("gpu")
        if policy is not None:
            yield CounterMetricFamily("agentcg_policy_ticks", "Policy loop ticks.", value=policy.ticks)
            yield GaugeMetricFamily("agentcg_policy_ladder_level", "The policy ladder's level (0: calm).",
                                    value=policy.state.level)
        tracker = getattr(bpf, "tracker", None)
        if tracker is not None:
            yield CounterMetricFamily("agentcg_bpf_events", "BPF ring buffer events read.", value=tracker.events)
            try:
                lost = tracker.lost_events
            except Exception:   # the map cannot be read now: no sample rather than a wrong one
                lost = None
            if lost is not None:
                yield CounterMetricFamily("agentcg_bpf_events_lost", "BPF events the ring buffer dropped.",
                                          value=lost)
        if gpu is not None:
            yield from self._gpu(gpu, {s.name for s in sessions})

    def _gpu(self, gpu: Any, live: set[str]) -> Iterator[Any]:
        if gpu.snap.present:
            dev = GaugeMetricFamily("agentcg_gpu_device_memory_bytes", "GPU memory of a device (NVML).",
                                    labels=["device", "state"])
            for x in gpu.snap.devices:
                dev.add_metric([str(x.index), "used"], x.used_bytes)
                dev.add_metric([str(x.index), "total"], x.total_bytes)
            yield dev
            per = GaugeMetricFamily("agentcg_session_gpu_memory_bytes",
                                    "GPU memory of the session's processes (agent and tool calls).",
                                    labels=["session"])
            for name, used in gpu._by_session().items():
                if name in live:
                    per.add_metric([name], used)
            yield per
        ws = gpu.worker_stats
        if not ws:
            return
        pools = GaugeMetricFamily("agentcg_worker_kv_blocks", "KV cache blocks of the inference worker.",
                                  labels=["pool", "state"])
        pools.add_metric(["gpu", "online"], ws.get("gpu_blocks_online", 0))
        pools.add_metric(["gpu", "free"], ws.get("gpu_blocks_free", 0))
        pools.add_metric(["host", "online"], ws.get("host_blocks", 0))
        pools.add_metric(["host", "free"], ws.get("host_blocks_free", 0))
        yield pools
        kv = GaugeMetricFamily("agentcg_session_kv_blocks", "The session's KV cache blocks in the worker.",
                               labels=["session", "pool"])
        for name, t in (ws.get("sessions") or {}).items():
            if name in live:
                kv.add_metric([name, "gpu"], t.get("blocks_gpu", 0))
                kv.add_metric([name, "host"], t.get("blocks_host", 0))
        yield kv
        swap = ws.get("swap") or {}
        swaps = CounterMetricFamily("agentcg_worker_kv_swaps", "KV swaps of the worker (out: to host).",
                                    labels=["direction"])
        nbytes = CounterMetricFamily("agentcg_worker_kv_swap_bytes", "Bytes the worker's KV swaps moved.",
                                     labels=["direction"])
        for direction in ("out", "in"):
            swaps.add_metric([direction], swap.get(f"swap_{direction}_count", 0))
            nbytes.add_metric([direction], swap.get(f"swap_{direction}_bytes", 0))
        yield from (swaps, nbytes)


class Metrics:
    """The hook: counts events, times requests, serves /metrics."""

    name = "metrics"

    def __init__(self, cfg: Any):
        self.cfg = cfg                   # core.config_metrics.MetricsConfig
        self.daemon: Any = None
        self.registry = prom.CollectorRegistry(auto_describe=False)
        r = self.registry
        self.calls_started = prom.Counter("agentcg_calls_started", "Tool calls started, by command class.",
                                          ["command"], registry=r)
        self.calls_ended = prom.Counter("agentcg_calls_ended", "Tool calls ended, by command class and result "
                                        "(ok: exit 0, failed: another status, unknown: none).",
                                        ["command", "result"], registry=r)
        self.call_duration = prom.Histogram("agentcg_call_duration_seconds", "Tool call wall time.", ["command"],
                                            buckets=DURATION_BUCKETS_S, registry=r)
        self.call_cpu = prom.Counter("agentcg_call_cpu_seconds", "CPU time of ended tool calls.", ["command"],
                                     registry=r)
        self.call_memory_peak = prom.Histogram("agentcg_call_memory_peak_bytes", "memory.peak of ended tool calls.",
                                               ["command"], buckets=MEMORY_BUCKETS_BYTES, registry=r)
        self.requests = prom.Histogram("agentcg_request_duration_seconds", "A request's time in the daemon, from "
                                       "the decoded request to its reply.", ["op"],
                                       buckets=REQUEST_BUCKETS_S, registry=r)
        self.policy_actions = prom.Counter("agentcg_policy_actions", "Policy actions, by kind, knob and outcome.",
                                           ["kind", "knob", "outcome"], registry=r)
        self.kills = prom.Counter("agentcg_kills", "Tool calls killed, by reason.", ["reason"], registry=r)
        self.kv_placements = prom.Counter("agentcg_kv_placements", "KV placement decisions sent to the worker.",
                                          ["op", "mode"], registry=r)
        for reason in KILL_REASONS:
            self.kills.labels(reason)   # present at 0, so that rate() sees the first kill
        self._ops: dict[str, Any] = {}       # op -> its histogram child, made at its first request
        self.commands = CommandLabels(cfg.max_commands, self._evict)
        self.session_calls: dict[str, tuple[int, int]] = {}
        self.call_commands: dict[tuple[str, int], str] = {}   # running call -> its label
        registry_collector = Collector(self)
        r.register(registry_collector)
        self.address: str | None = None
        self.state = "starting"
        self.reason = ""
        self.scrapes = 0
        self.scrape_ns: collections.deque[int] = collections.deque(maxlen=100)
        self._server: asyncio.base_events.Server | None = None

    # -- wiring ---------------------------------------------------------------------
    def bind(self, daemon: Any) -> None:
        """Read the daemon's records at scrape time, count its events, time its requests."""
        self.daemon = daemon
        daemon.events.subscribers.append((None, _EventSink(self.on_event)))   # None: sees every event
        handle = daemon.handle

        async def timed_handle(msg: dict[str, Any], peer: Any) -> dict[str, Any]:
            t0 = time.perf_counter_ns()
            try:
                return await handle(msg, peer)
            finally:
                self.observe_request(msg.get("op") if isinstance(msg, dict) else None,
                                     time.perf_counter_ns() - t0)
        daemon.handle = timed_handle

    def observe_request(self, op: Any, dur_ns: int) -> None:
        if not isinstance(op, str) or op not in p.OPS:   # anything a client may send: bounded
            op = OTHER
        child = self._ops.get(op)
        if child is None:
            child = self._ops[op] = self.requests.labels(op)
        child.observe(dur_ns / 1e9)

    def _evict(self, command: str) -> None:
        for metric, label_sets in ((self.calls_started, [(command,)]),
                                   (self.calls_ended, [(command, r) for r in RESULTS]),
                                   (self.call_duration, [(command,)]), (self.call_cpu, [(command,)]),
                                   (self.call_memory_peak, [(command,)])):
            for labels in label_sets:
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass

    # -- hook methods ---------------------------------------------------------------
    def on_session_create(self, session: Any, path: Any) -> None:
        self.session_calls.setdefault(session.name, (0, 0))

    def on_session_end(self, session: Any, path: Any) -> None:
        self.session_calls.pop(session.name, None)
        for key in [k for k in self.call_commands if k[0] == session.name]:
            del self.call_commands[key]

    def on_call_start(self, session: Any, call: Any, path: Any) -> None:
        label = self.commands.label(command_class(call.argv, call.name))
        self.call_commands[(session.name, call.n)] = label
        self.calls_started.labels(label).inc()
        started, ended = self.session_calls.get(session.name, (0, 0))
        self.session_calls[session.name] = (started + 1, ended)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "call.end":
            self._call_end(event)
        elif kind == "policy.action":
            outcome = str(event.get("outcome", ""))
            outcome = "failed" if outcome.startswith("failed") else outcome if outcome in OUTCOMES else OTHER
            self.policy_actions.labels(str(event.get("kind")), str(event.get("knob")), outcome).inc()
            if event.get("kind") == "kill" and outcome == "done":
                self.kills.labels("policy").inc()
        elif kind == "gpu.kill":
            self.kills.labels("gpu").inc()
        elif kind == "gpu.kv":
            self.kv_placements.labels(str(event.get("op")), str(event.get("mode"))).inc()

    def _call_end(self, r: dict[str, Any]) -> None:
        name, n = r.get("session"), r.get("call")
        label = self.call_commands.pop((name, n), None)
        if label is None:   # a call started before this daemon (restored)
            label = self.commands.label(command_class(None, str(r.get("name") or "")))
        status = r.get("exit_status")
        result = "unknown" if status is None else "ok" if status == 0 else "failed"
        self.calls_ended.labels(label, result).inc()
        st = r.get("stats") or {}
        if st.get("wall_ns") is not None:
            self.call_duration.labels(label).observe(st["wall_ns"] / 1e9)
        if st.get("cpu_usage_usec") is not None:
            self.call_cpu.labels(label).inc(st["cpu_usage_usec"] / 1e6)
        if st.get("memory_peak_bytes") is not None:
            self.call_memory_peak.labels(label).observe(st["memory_peak_bytes"])
        if st.get("stragglers_action") == "killed":
            self.kills.labels("straggler").inc()
        if (st.get("memory_events") or {}).get("oom_kill"):
            self.kills.labels("oom").inc()
        if name in self.session_calls:
            started, ended = self.session_calls[name]
            self.session_calls[name] = (started, ended + 1)

    def status(self) -> dict[str, Any]:
        xs = sorted(self.scrape_ns)
        return {"listen": self.cfg.listen, "address": self.address, "state": self.state,
                **({"reason": self.reason} if self.reason else {}), "scrapes": self.scrapes,
                "scrape_ms_p50": round(xs[len(xs) // 2] / 1e6, 3) if xs else None,
                "command_classes": len(self.commands), "max_commands": self.cfg.max_commands}

    # -- the endpoint ---------------------------------------------------------------
    async def run(self, daemon: Any) -> None:
        if self.daemon is None:
            self.bind(daemon)
        try:
            self._server = await asyncio.start_server(self._http, self.cfg.host, self.cfg.port,
                                                      limit=HTTP_HEAD_MAX_BYTES)
        except OSError as exc:
            self.state, self.reason = "failed", f"cannot listen on {self.cfg.listen}: {exc.strerror or exc}"
            log.error("no metrics endpoint: %s", self.reason)
            return
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.state = "serving"
        log.info("metrics on http://%s/metrics", self.address)
        try:
            await asyncio.Event().wait()   # until the daemon stops (cancelled)
        finally:
            self._server.close()

    def render(self) -> bytes:
        t0 = time.perf_counter_ns()
        body = prom.generate_latest(self.registry)
        self.scrapes += 1
        self.scrape_ns.append(time.perf_counter_ns() - t0)
        return body

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection: GET /metrics (HEAD too), / and nothing else."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT_S)
            words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (words[0], words[1]) if len(words) >= 2 else ("", "")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", prom.CONTENT_TYPE_LATEST, self.render()
            elif path == "/":
                status, ctype, body = "200 OK", "text/plain", b"agentcgd: Prometheus metrics at /metrics\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found: GET /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass   # a client that hung up, stalled or sent a huge head: no answer
        except Exception:
            log.exception("metrics: a scrape failed")
        finally:
            writer.close()


class MetricsUnavailable:
    """[metrics] is set but prometheus_client is missing: says so in status."""

    name = "metrics"

    def __init__(self, cfg: Any, reason: str):
        self.cfg, self.reason = cfg, reason

    def status(self) -> dict[str, Any]:
        return {"listen": self.cfg.listen, "address": None, "state": "unavailable", "reason": self.reason}


def add_metrics_hook(config: Any, hooks: Any) -> Callable[[Any], None]:
    """Register the metrics hook that `[metrics] listen` asks for; ->
    bind(daemon), to call once the daemon exists. Nothing at all without it."""
    cfg = config.metrics
    if not cfg.enabled:
        return lambda daemon: None
    if prom is None:
        why = "prometheus_client is not installed (pip install 'agentcg[metrics]')"
        log.error("[metrics] listen = %r is set but %s: no metrics endpoint", cfg.listen, why)
        hooks.add(MetricsUnavailable(cfg, why))
        return lambda daemon: None
    m = Metrics(cfg)
    hooks.add(m)
    return m.bind
