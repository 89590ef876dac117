"""The policy loop: kernel signals -> snapshot -> decide -> executor.

A daemon hook (see hooks.py). It watches every session's memory.pressure with
a PSI trigger and every session's and tool call's memory.events (a
memory.high breach wakes it at once), builds a snapshot from the cgroup tree
when something fires (or when a call starts, or when the ladder asked to look
again), hands it to the pure core and applies the actions through the
executor, the only writer. Keeps the last actions for `agentcg status`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

from agentcg.adapters.cgroupfs import CgroupFs, OpenFiles
from agentcg.adapters.cgroupview import ViewReader
from agentcg.adapters.executor import Applied, Executor
from agentcg.adapters.procfs import swap_free_bytes
from agentcg.adapters.psi import PsiUnsupported, SignalWatch
from agentcg.core.policy import (
    CallView, CgroupView, HostView, PolicyState, Ruleset, SessionView, Snapshot, TriggerEvent, plan,
)

log = logging.getLogger("agentcg.policy")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")  # the unit of memory.{high,max,low}
IDLE_TICK_S = 1.0  # only for calm-down bookkeeping; pressure and breaches wake the loop at once
# A call's start or end is looked at within this; the kicks of the calls that
# start and end meanwhile share one tick. A tick reads every cgroup of the
# tree: one per kick would put it on the path of the next request, every call.
KICK_DELAY_S = 0.025


def _pcts(values) -> dict:
    """p50/p99/max in microseconds of a window of nanosecond values."""
    xs = sorted(values)
    if not xs:
        return {"count": 0}
    pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] / 1000, 1)  # noqa: E731
    return {"count": len(xs), "p50": pick(0.5), "p99": pick(0.99), "max": round(xs[-1] / 1000, 1)}


class PolicyLoop:
    name = "policy"

    def __init__(self, cgfs: CgroupFs, ruleset: Ruleset, *, dry_run: bool = False, keep_last: int = 50,
                 psi_stall_us: int = 10_000, psi_window_us: int = 500_000, executor: Executor | None = None,
                 files: OpenFiles | None = None, watch: SignalWatch | None = None):
        """executor, files and watch: the shared writer, the kept-open
        interface files and the kernel signal watch (built by daemon/app.py;
        made here when not given)."""
        self.cgfs = cgfs
        self.ruleset = ruleset
        self.dry_run = dry_run or ruleset.dry_run
        self.executor = executor or Executor(cgfs)
        # every tick reads the same files of the same cgroups: kept open (one pread each)
        self.views = ViewReader(files or OpenFiles(cgfs))
        self.watch = watch or SignalWatch()
        self.state = PolicyState()
        self.last: collections.deque[Applied] = collections.deque(maxlen=keep_last)
        self.sessions: dict[str, Any] = {}
        self.call_notes: dict[str, list[dict]] = {}
        self.psi_stall_us = psi_stall_us
        self.psi_window_us = psi_window_us
        self.ticks = 0
        # how long a tick takes, and a memory.events signal -> the first action it led to
        self.tick_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self.signal_to_action_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self.daemon = None
        self.wake_in_ns: int | None = None
        self._pending: dict[str, list[TriggerEvent]] = {}
        self.failed: set[tuple[str, str]] = set()  # files this kernel refuses: not retried
        # Set by run(): call start/end only kick the loop, which ticks once for
        # any number of kicks, instead of a full snapshot and tick inline on
        # the tool call's start and end path (about 2 ms per call).
        self._kick: asyncio.Event | None = None
        self._kick_due: float | None = None   # monotonic time by which a kick is served
        self.watch.watch_file("", cgfs.path(""), "memory.events")

    # -- hook surface
    def on_session_create(self, session, path) -> None:
        self.sessions[session.name] = session
        rel = session.rel
        try:
            self.watch.watch_pressure(rel, path, stall_us=self.psi_stall_us, window_us=self.psi_window_us)
        except PsiUnsupported as exc:
            log.warning("no PSI trigger on %s: %s", rel, exc)
        self.watch.watch_file(rel, path, "memory.events")

    def on_session_end(self, session, path) -> None:
        self.sessions.pop(session.name, None)
        self.watch.unwatch(session.rel)
        self.files.forget(session.rel)

    def on_call_start(self, session, call, path) -> None:
        self.sessions[session.name] = session
        self.watch.watch_file(call.rel, path, "memory.events")
        self._tick_soon()  # initial marks for the new call

    def on_call_end(self, session, call, path) -> dict:
        self.watch.unwatch(call.rel)
        self.files.forget(call.rel)
        self.failed = {f for f in self.failed if f[0] != call.rel}
        self.views.forget(call.rel)
        self._tick_soon()  # memory is being given back: pressure may be gone
        notes = self.call_notes.pop(call.rel, [])
        if not notes:
            return {}
        killed = any(n["kind"] == "kill" for n in notes)
        feedback = [n["feedback"] for n in notes if n.get("feedback")]
        return {"policy": {"killed": killed, "froze": any(n["kind"] == "freeze" for n in notes),
                           "feedback": feedback, "actions": [n["line"] for n in notes][-10:]}}

    def status(self) -> dict:
        return {"dry_run": self.dry_run, "rules": self.ruleset.names(), "ladder_level": self.state.level,
                "frozen": list(self.state.frozen), "ticks": self.ticks,
                "tick_us": _pcts(self.tick_ns), "signal_to_action_us": _pcts(self.signal_to_action_ns),
                "last_actions": [a.to_dict() for a in self.last]}

    def _tick_soon(self) -> None:
        if self._kick is None:  # no loop running (tests, dry runs): tick now
            try:
                self.tick([])
            except Exception:
                log.exception("policy tick failed")
        elif self._kick_due is None:
            self._kick_due = time.monotonic() + KICK_DELAY_S
            self._kick.set()

    async def _wait(self, timeout_s: float) -> list:
        """Kernel signals (at once), or a kick's delay (KICK_DELAY_S after the
        first kick since the last tick), or the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            due = deadline if self._kick_due is None else min(deadline, self._kick_due)
            if due <= now:
                break
            self._kick.clear()
            kick = asyncio.ensure_future(self._kick.wait())
            sigs = asyncio.ensure_future(self.watch.wait(due - now))
            try:
                await asyncio.wait({kick, sigs}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (kick, sigs):
                    if not t.done():
                        t.cancel()
            got = sigs.result() if sigs.done() and not sigs.cancelled() else []
            if got:
                self._kick_due = None    # this tick serves the pending kicks too
                return got
        self._kick_due = None
        return self.watch.drain(0)

    async def run(self, daemon) -> None:
        self.daemon = daemon
        self._kick = asyncio.Event()
        while True:
            timeout = IDLE_TICK_S if self.wake_in_ns is None else min(IDLE_TICK_S, max(0.001, self.wake_in_ns / 1e9))
            try:
                signals = await self._wait(timeout)
                self.tick(signals)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not end the loop
                log.exception("policy tick failed")
                await asyncio.sleep(0.1)

    def close(self) -> None:
        self.watch.close()
        self.files.close()

    @property
    def files(self) -> OpenFiles:
        """The kept-open interface files every view is read through."""
        return self.views.files

    @files.setter
    def files(self, files: OpenFiles) -> None:
        self.views.files = files

    # -- read, decide, act
    def _cg(self, rel: str) -> CgroupView:
        return self.views.read_view(rel, self._pending.pop(rel, ()))

    def snapshot(self) -> Snapshot:
        host_cg = self._cg("")
        sessions = []
        live = {""}  # the cgroups read this time; descriptors of any other are closed below
        for s in list(self.sessions.values()):
            if not self.cgfs.exists(s.rel):
                continue
            live |= {s.rel, f"{s.rel}/agent"} | {c.rel for c in s.calls.values()}
            calls = []
            for n, c in sorted(s.calls.items()):
                cmd = " ".join(c.argv) if c.argv else c.name
                calls.append(CallView(s.name, f"c-{n}", self._cg(c.rel), started_ns=c.start_ns,
                                      intent_memory_bytes=c.intent.memory_bytes,
                                      intent_memory_max_bytes=c.intent.memory_max_bytes,
                                      cpu_class=c.intent.cpu_class, blocking=True, cmd=cmd))
            sessions.append(SessionView(
                s.name, self._cg(s.rel), s.intent.priority or 0, self.views.read_usage(f"{s.rel}/agent"),
                tuple(calls), s.intent.memory_bytes, s.intent.memory_max_bytes, s.intent.cpu_class))
        budget = host_cg.memory_max_bytes
        self.files.keep_only(live)
        inactive = self.views.inactive_file_bytes() if budget is not None else 0
        swap = self.views.swap_room_bytes(swap_free_bytes())
        return Snapshot(time.monotonic_ns(), HostView(host_cg, budget, swap, inactive, PAGE_BYTES),
                        tuple(sessions), self.state)

    def tick(self, signals) -> list[Applied]:
        t0 = time.monotonic_ns()
        woke = min((sig.t_ns for sig in signals if sig.source == "events"), default=None)
        for sig in signals:
            if sig.source == "psi":
                self._pending.setdefault(sig.key, []).append(TriggerEvent(sig.kind, sig.stall_us, sig.window_us))
        snap = self.snapshot()
        decision = plan(snap, self.ruleset)
        self.state = decision.state
        self.wake_in_ns = decision.wake_in_ns
        self.ticks += 1
        done = []
        for action in decision.actions:
            if (action.target, action.knob) in self.failed:
                continue
            applied = self.executor.apply(action, dry_run=self.dry_run)
            if applied.outcome.startswith("failed"):
                self.failed.add((action.target, action.knob))
            self.last.append(applied)
            done.append(applied)
            if self.daemon is not None:
                d = applied.to_dict()
                d["type"] = "policy.action"
                self.daemon.emit(d)
            if "/c-" in action.target:
                self.call_notes.setdefault(action.target, []).append(
                    {"kind": action.kind, "line": applied.line(), "feedback": action.feedback})
        self.tick_ns.append(time.monotonic_ns() - t0)
        if woke is not None and done:
            self.signal_to_action_ns.append(max(0, done[0].t_ns - woke))
        return done
