"""Automatic mode and the other uses of agentcg's BPF programs by the daemon.

`BpfHook` is a daemon hook (daemon/hooks.py): it loads what this host can run
(the process tracker, network intent, the sched_ext scheduler; loaders in
agentcg/adapters/bpf.py), feeds the tracker's process events to the pure
`Attribution` (agentcg/core/attribution.py), and applies its decisions through
the daemon's service API: a new tool call for a command an attached agent
runs (`Daemon.start_call`), a process moved into its call
(`Daemon.place_in_call`), a call ended when its root exits
(`Daemon.end_call`). At a call's end it adds the kernel's counts (forks,
execs, OOM kills, run-queue latency, network bytes) to the call's stats.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from agentcg.adapters import bpf_types as T
from agentcg.adapters.bpf import (BpfStatus, Feature, NetPolicy, SchedExt, SchedExtUnavailable, Tracker,
                                  attached_names, cgroup_id, probe_host)
from agentcg.adapters.libbpf import LibbpfError
from agentcg.adapters.procfs import pid_exists
from agentcg.adapters.stopguard import Watchdog, continue_stopped, sweep
from agentcg.core.attribution import Attribution, CallFinished, MoveToCall, NewCall, OomVictim
from agentcg.core.intents import Intent

log = logging.getLogger("agentcg.bpf")


class BpfHook:
    """agentcgd's eBPF extension (see daemon/hooks.py): process tracking,
    automatic mode, escapes, per-call kernel stats, network intent.

    Built once in daemon/app.py:build(). The loaders and the probe are
    agentcg/adapters/bpf.py; new tool calls and moves go through the
    daemon's service API (start_call, place_in_call, end_call). Everything it cannot load is reported
    in status() with the reason; the daemon works without it.
    """

    name = "bpf"

    def __init__(self, root: str | os.PathLike, *, rules=(), escape_action: str = "keep",
                 runq: bool = True, network: bool = True, sched_ext: bool = True, placement_keep: int = 4096,
                 attribution: Attribution | None = None, stop_until_placed: bool = True,
                 stop_timeout_ms: int = 2000):
        self.root = Path(root)
        self.attr = attribution or Attribution(rules=rules, escape_action=escape_action)
        self.tracker: Tracker | None = None
        self.net: NetPolicy | None = None
        self.daemon: Any = None
        self.placement_ns: deque[int] = deque(maxlen=placement_keep)
        self.auto_calls = 0
        self.escapes = 0
        self.oom_victims: dict[tuple[str, int | None], list[dict]] = {}
        self._agents: dict[str, int] = {}
        self._cgids: dict[str, int] = {}          # rel path -> cgroup id
        self._escaped: dict[tuple[str, int], dict[int, dict]] = {}
        self.runq, self.network, self.use_sched_ext = runq, network, sched_ext
        self.sched: SchedExt | None = None
        self._sched_ejected: str | None = None
        self._auto_calls: set[tuple[str, int]] = set()
        self._pending_auto: set[int] = set()
        self.started = False
        # stop until placed: agent children stopped at exec, continued here once in their call
        self.stop_until_placed, self.stop_timeout_ms = stop_until_placed, stop_timeout_ms
        self.watchdog: Watchdog | None = None
        self.stop_wait_ns: deque[int] = deque(maxlen=placement_keep)   # exec -> continued
        self._stopped_now: int | None = None     # tgid of the stopped exec being handled
        self._agent_cgs: dict[str, int] = {}     # session -> agent cgroup id, in the tracker's map
        self.status_ = BpfStatus(reason="not started yet (loads when the daemon listens)")

    def start(self) -> None:
        """Probe, load and attach (the cgroup root must exist). Idempotent."""
        if self.started:
            return
        self.started = True
        runq, network = self.runq, self.network
        self.status_ = probe_host()
        if not self.status_.available:
            return
        feats = self.status_.features
        if feats.get("tracing", Feature("absent")).state == "available" and \
                feats.get("ringbuf", Feature("absent")).state == "available":
            try:
                self.tracker = Tracker(self.root, runq=runq)
                feats["tracker"] = Feature("used", f"{self.tracker.flavor} sched_process_fork/exec/exit, "
                                                   f"mark_victim{', runq latency' if runq else ''}")
            except (LibbpfError, OSError, KeyError) as exc:
                feats["tracker"] = Feature("failed", str(exc).splitlines()[0])
            self._start_stop(feats)
        else:
            feats["tracker"] = Feature("off", "needs tracing programs and ring buffers")
        if network and feats.get("cgroup_bpf", Feature("absent")).state == "available":
            try:
                self.net = NetPolicy(self.root)
                feats["netpolicy"] = Feature("used", "cgroup sock_create/connect/sendmsg/bind + skb counters")
            except (LibbpfError, OSError, KeyError) as exc:
                feats["netpolicy"] = Feature("failed", str(exc).splitlines()[0])
        elif network:
            feats["netpolicy"] = Feature("off", "cgroup BPF programs unavailable: network intent not enforced")
        if os.environ.get("AGENTCG_SCHED_EXT") == "0":
            self.use_sched_ext = False
            if feats.get("sched_ext", Feature("absent")).state == "available":
                feats["sched_ext"] = Feature("off", "disabled by AGENTCG_SCHED_EXT=0")
        if self.use_sched_ext and feats.get("sched_ext", Feature("absent")).state == "available":
            try:
                self.sched = SchedExt()
                feats["sched_ext"] = Feature("used", "agentcg scheduler: cgroup weights and boost from intents")
            except (SchedExtUnavailable, LibbpfError, OSError, KeyError) as exc:
                feats["sched_ext"] = Feature("off", str(exc).splitlines()[0])

    def _start_stop(self, feats: dict[str, Feature]) -> None:
        """Stop until placed: on where the tracker may send SIGSTOP and its watchdog runs."""
        tr = self.tracker
        if not self.stop_until_placed:
            feats["stop_until_placed"] = Feature("off", "[bpf] stop_until_placed = false: children run "
                                                        "outside their call until placed")
            return
        if tr is None:
            feats["stop_until_placed"] = Feature("off", "needs the tracker")
            return
        if not tr.stop_supported:
            why = next((n for n in tr.load_notes if "with stop" in n), "bpf_send_signal refused")
            feats["stop_until_placed"] = Feature("absent", f"kernel refused bpf_send_signal in the exec hook "
                                                           f"({why}): children run outside their call until placed")
            return
        try:
            self.watchdog = Watchdog(tr.stopped_map_fd(), self.stop_timeout_ms)
            tr.set_stop(True)
        except (LibbpfError, OSError) as exc:
            feats["stop_until_placed"] = Feature("failed", str(exc).splitlines()[0])
            return
        feats["stop_until_placed"] = Feature("used", f"SIGSTOP at exec (bpf_send_signal) until placed; "
                                                     f"watchdog continues after {self.stop_timeout_ms} ms")

    def _check_watchdog(self) -> None:
        """A dead watchdog: the bound no longer holds, so stop no more and continue all."""
        if self.watchdog is None or self.watchdog.alive() or self.tracker is None:
            return
        code = self.watchdog.proc.returncode
        self.watchdog = None
        try:
            self.tracker.set_stop(False)
            sweep(self.tracker.stopped(), 0)
        except (LibbpfError, OSError):
            pass
        self.status_.features["stop_until_placed"] = Feature("failed", f"watchdog exited ({code}): stop off")
        if self.daemon is not None:
            self.daemon.emit({"type": "bpf.stop.off", "uid": 0, "reason": f"watchdog exited ({code})"})

    def _continue(self, tgid: int, exec_ts_ns: int) -> int:
        """SIGCONT a child stopped at exec; ns from its exec to now."""
        if self._stopped_now == tgid:
            self._stopped_now = None
        if self.tracker is not None:
            continue_stopped(self.tracker.stopped(), tgid)
        waited = max(0, time.monotonic_ns() - exec_ts_ns)
        self.stop_wait_ns.append(waited)
        return waited

    # -- lifecycle hooks ------------------------------------------------------
    def _cgid(self, path: Path) -> int | None:
        try:
            return cgroup_id(path)
        except FileNotFoundError:
            return None

    def on_session_create(self, session, path: Path) -> None:
        for sub, call in ((path, None), (path / "agent", None)):
            cg = self._cgid(sub)
            if cg is not None:
                self.attr.add_cgroup(cg, session.name, call)
                self._set_sched(cg, getattr(session.limits, "cpu_weight", None), False)

    def on_session_end(self, session, path: Path) -> None:
        self.attr.session_ended(session.name)
        self._agents.pop(session.name, None)
        cg = self._agent_cgs.pop(session.name, None)
        if cg is not None and self.tracker is not None:
            self.tracker.forget_agent(cg)

    def on_call_start(self, session, call, path: Path) -> None:
        cg = self._cgid(path)
        if cg is None:
            return
        self._cgids[str(path)] = cg
        self.attr.add_cgroup(cg, session.name, call.n)
        self.attr.call_placed(session.name, call.n, [call.pid])
        boost = getattr(call.intent, "cpu_class", None) == "latency" or \
            (session.name, call.n) in self._auto_calls or \
            (self._agents.get(session.name) is not None and call.pid in self._pending_auto)
        self._set_sched(cg, getattr(call.limits, "cpu_weight", None), boost)
        mode = getattr(call.intent, "network", None) or "full"
        if self.net is not None and mode != "full":
            self.net.set_mode(cg, mode)

    def _set_sched(self, cg: int, weight: int | None, boost: bool) -> None:
        if self.sched is None:
            return
        w = max(T.AGENTCG_SCHED_WEIGHT_MIN, min(T.AGENTCG_SCHED_WEIGHT_MAX, int(weight or T.AGENTCG_SCHED_WEIGHT_DFL)))
        try:
            self.sched.set_weight(cg, w, boost)
        except LibbpfError:
            pass

    def on_call_end(self, session, call, path: Path) -> dict[str, Any]:
        cg = self._cgids.pop(str(path), None) or self._cgid(path)
        out: dict[str, Any] = {}
        escapes = self.report_escapes(session, call.n)
        if escapes:
            out["escapes"] = escapes
        if cg is None:
            return out
        if self.tracker is not None:
            st = self.tracker.cg_stats(cg)
            out["proc_count"] = st["forks"] + 1        # the placed root + every process forked in the call
            out["exec_count"] = st["execs"]
            out["oom_kills"] = st["oom_kills"]
            h = self.tracker.runq_hist(cg)
            out["runq_waits"] = h["count"]
            out["runq_p50_us"] = h["p50_ns"] / 1000 if h["p50_ns"] is not None else None
            out["runq_p99_us"] = h["p99_ns"] / 1000 if h["p99_ns"] is not None else None
            self.tracker.forget_cgroup(cg)
        victims = self.oom_victims.pop((session.name, call.n), None)
        if victims:
            out["oom_victims"] = victims
        if self.net is not None:
            ns = self.net.net_stats(cg)
            out["net_tx_bytes"] = ns["tx_bytes"]
            out["net_rx_bytes"] = ns["rx_bytes"]
            out["net_denied"] = ns["denied"]
            self.net.forget(cg)
        if self.sched is not None:
            try:
                self.sched.forget(cg)
            except LibbpfError:
                pass
        self._auto_calls.discard((session.name, call.n))
        self.attr.remove_cgroup(cg)
        self._escaped.pop((session.name, call.n), None)
        return out

    def report_escapes(self, session, n: int) -> list[dict]:
        """Processes of call n still alive now: reported once (event call.escape), kept for the stats."""
        key = (session.name, n)
        seen = self._escaped.setdefault(key, {})
        for e in self.attr.call_ended(session.name, n):
            if e.pid in seen:
                continue
            seen[e.pid] = {"pid": e.pid, "comm": e.comm, "cmdline": e.cmdline, "reparented": e.reparented,
                           "action": e.action, "reason": e.reason}
            self.escapes += 1
            if self.daemon is not None:
                self.daemon.emit({"type": "call.escape", "uid": session.uid, "session": session.name,
                                  "call": n, **seen[e.pid]})
        return list(seen.values())

    def status(self) -> dict[str, Any]:
        st = self.status_
        if self.tracker is not None:
            st.events = self.tracker.events
            st.decode_errors = self.tracker.decode_errors
            try:
                st.lost_events = self.tracker.lost_events
            except LibbpfError:
                pass
        st.attached = attached_names((self.tracker.links if self.tracker else []) +
                                     (self.net.links if self.net else []))
        if self.sched is not None:
            why = self.sched.ejected()
            if why:
                st.features["sched_ext"] = Feature("failed", f"thrown out by the kernel: {why}")
                if self._sched_ejected is None and self.daemon is not None:
                    self.daemon.emit({"type": "bpf.sched_ext.ejected", "uid": 0, "reason": why})
                self._sched_ejected = why
        d = st.as_dict()
        d["processes"] = self.trees()
        d["automatic_mode"] = {"agents": dict(self._agents), "calls": self.auto_calls,
                               "escapes": self.escapes, "placement": self.placement_summary(),
                               "stop_until_placed": self.stop_summary()}
        d["tracked_processes"] = len(self.attr)
        return d

    def trees(self) -> dict[str, dict[str, list]]:
        """Live process trees of running calls, by session then call number."""
        out: dict[str, dict[str, list]] = {}
        if self.daemon is None:
            return out
        for s in list(self.daemon.sessions.values()):
            calls = {str(n): self.attr.tree(s.name, n) for n in list(s.calls)}
            calls = {n: t for n, t in calls.items() if t}
            if calls:
                out[s.name] = calls
        return out

    def stop_summary(self) -> dict[str, Any]:
        """Children stopped at exec, refusals, and exec -> continued latency."""
        out = _percentiles(self.stop_wait_ns)
        if self.tracker is not None and self.tracker.stop_supported:
            try:
                out["stops"] = self.tracker.counter(T.AGENTCG_CTR_EXEC_STOPS)
                out["stop_failures"] = self.tracker.counter(T.AGENTCG_CTR_STOP_FAILS)
            except LibbpfError:
                pass
        out["enabled"] = self.watchdog is not None
        return out

    def placement_summary(self) -> dict[str, Any]:
        return _percentiles(self.placement_ns)

    def close(self) -> None:
        if self.tracker is not None and self.watchdog is not None:
            try:
                self.tracker.set_stop(False)    # before the watchdog goes: nothing new is stopped
            except LibbpfError:
                pass
        if self.watchdog is not None:
            self.watchdog.close()               # it continues whatever is still listed
            self.watchdog = None
        if self.sched is not None:
            self.sched.close()
            self.sched = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.net is not None:
            self.net.close()
            self.net = None

    # -- the event loop ---------------------------------------------------------
    async def run(self, daemon) -> None:
        self.daemon = daemon
        self.start()
        for s in list(daemon.sessions.values()):
            self.on_session_create(s, daemon.cgfs.path(s.rel))
            for c in s.calls.values():
                self.on_call_start(s, c, daemon.cgfs.path(c.rel))
        if self.tracker is None:
            return
        loop = asyncio.get_running_loop()
        fd = self.tracker.epoll_fd()
        # events are handled in the reader callback itself: no extra loop iteration
        # between the ring buffer's wakeup and the move into the call cgroup
        loop.add_reader(fd, self._drain, daemon)
        try:
            while True:
                self._check_watchdog()
                self._sync_agents(daemon)
                self._drain(daemon)
                await asyncio.sleep(0.1)
        finally:
            loop.remove_reader(fd)

    def _drain(self, daemon) -> None:
        if self.tracker is None:
            return
        try:
            events = self.tracker.poll(0)
        except LibbpfError:
            return
        for ev in events:
            self._stopped_now = ev.tgid if ev.stopped else None
            for d in self.attr.feed(ev):
                try:
                    self._apply(daemon, d)
                except Exception:  # one bad decision must not stop the tracker
                    log.exception("applying %s failed", d)
            if self._stopped_now is not None:
                # stopped but not placed by a decision (not a new call, or placement failed)
                self._continue(self._stopped_now, ev.ts_ns)

    def _sync_agents(self, daemon) -> None:
        """Sessions with attached agent pids are in automatic mode."""
        for s in list(daemon.sessions.values()):
            agents = [pid for pid in s.attached if pid_exists(pid)]
            cur = self._agents.get(s.name)
            if agents and cur not in agents:
                cg = self._cgid(daemon.cgfs.path(f"{s.rel}/agent"))
                if cg is not None:
                    self.attr.add_cgroup(cg, s.name, None)
                    self.attr.register_agent(s.name, agents[0], cg)
                    self._agents[s.name] = agents[0]
                    if self.tracker is not None:
                        self.tracker.set_agent(cg, agents[0])
                        self._agent_cgs[s.name] = cg

    def place_new_call(self, daemon, d) -> int | None:
        """Automatic mode: a fresh tool call for d.root_pid, then its early descendants."""
        s = daemon.sessions.get(d.session)
        if s is None:
            return None
        seen_ns = time.monotonic_ns()
        self._pending_auto.add(d.root_pid)
        try:
            started = daemon.start_call(s, pid=d.root_pid, name=d.program, argv=[d.cmdline],
                                        intent=Intent.parse(dict(d.intent)))
        except Exception as exc:  # the process may be gone already
            daemon.emit({"type": "call.auto.failed", "uid": s.uid, "session": d.session, "pid": d.root_pid,
                         "reason": str(exc)})
            return None
        finally:
            self._pending_auto.discard(d.root_pid)
        n = started.call.n
        self._auto_calls.add((d.session, n))
        placed_ns = time.monotonic_ns()
        for pid in d.pids[1:]:
            # forked by the agent before placement: moved, and still protected from the OOM killer
            daemon.place_in_call(s, n, pid)
        self.attr.call_placed(d.session, n, d.pids, root_pid=d.root_pid)
        self.placement_ns.append(max(0, placed_ns - d.exec_ts_ns))
        stopped = self._stopped_now == d.root_pid
        waited_ns = self._continue(d.root_pid, d.exec_ts_ns) if stopped else None
        self.auto_calls += 1
        daemon.emit({"type": "call.auto", "uid": s.uid, "session": d.session, "call": n, "pid": d.root_pid,
                     "pids": list(d.pids), "command": d.cmdline, "reason": d.reason,
                     "placement_us": (placed_ns - d.exec_ts_ns) / 1000,
                     "seen_us": (seen_ns - d.exec_ts_ns) / 1000,
                     "call_start_us": (placed_ns - seen_ns) / 1000, "stopped": stopped,
                     "continued_us": waited_ns / 1000 if waited_ns is not None else None})
        return n

    def _apply(self, daemon, d) -> None:
        if isinstance(d, NewCall):
            self.place_new_call(daemon, d)
        elif isinstance(d, MoveToCall):
            s = daemon.sessions.get(d.session)
            if s is not None:
                daemon.place_in_call(s, d.call, d.pid)
        elif isinstance(d, CallFinished):
            s = daemon.sessions.get(d.session)
            c = s.calls.get(d.call) if s else None
            if c is not None:
                self.report_escapes(s, d.call)   # before the daemon's straggler policy acts
                try:
                    status = os.waitstatus_to_exitcode(d.exit_code)
                except ValueError:
                    status = None
                asyncio.ensure_future(daemon.end_call(s, c, exit_status=status, reason=d.reason))
        elif isinstance(d, OomVictim):
            self.oom_victims.setdefault((d.session, d.call), []).append(
                {"pid": d.pid, "comm": d.comm, "ts_ns": d.ts_ns})
            s = daemon.sessions.get(d.session)
            daemon.emit({"type": "oom.kill", "uid": s.uid if s else 0, "session": d.session, "call": d.call,
                         "pid": d.pid, "comm": d.comm})


def _percentiles(ns: Any) -> dict[str, Any]:
    xs = sorted(ns)
    if not xs:
        return {"count": 0}
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] / 1000  # noqa: E731
    return {"count": len(xs), "p50_us": pick(0.50), "p99_us": pick(0.99)}
