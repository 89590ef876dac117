"""GPU memory coordination: NVML sampling, attribution, `gpu_memory` admission.

A hook (daemon/hooks.py). Every `[gpu] sample_interval_ms` it reads NVML
(agentcg/adapters/nvml.py) and attributes each process's GPU memory through
its cgroup to a tool call, a session's agent or the worker
(core/gpu_budget.py `attribute`). A call's highest sample is its
`gpu_memory_peak_bytes` (in the call's stats, `extra`). Running calls that
use more than they declared are reported (`gpu.overuse` events, feedback
in the call's stats) and, with `[gpu] enforce = "kill"`, killed.

Admission (`admit_call`, awaited before call.start places the call): a call
with a `gpu_memory` intent waits until the planner admits it. When free
device memory is short, the worker is asked to `shrink` its KV pool by what
is missing; the call starts once NVML shows the memory free. The bytes the
pool gave up are a loan, given back (`grow`) when the call ends. A call that
cannot fit is refused (`on_no_room = "refuse"`), or waits up to
`admit_timeout_s` and is then refused. Without a GPU (or NVML) calls are
admitted and the reason says the budget was not checked.

Loans survive a daemon restart in <runtime_dir>/gpu.json.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from agentcg import protocol as p
from agentcg.core.gpu_budget import (Admit, BudgetInput, GpuSnapshot, GpuUsage, Kill, OverUse, PendingCall,
                                     Queue, Refuse, RunningCall, Shrink, Undeclared, attribute, loans_after, plan)
from agentcg.units import format_bytes

from .state import write_atomic

log = logging.getLogger("agentcg.daemon.gpu")
ADMIT_POLL_S = 0.2
ABSENT_RETRY_SAMPLES = 30     # NVML absent: look again this many samples later


def call_id(session: str, n: int) -> str:
    return f"{session}/{n}"


class GpuCoordinator:
    name = "gpu"

    def __init__(self, settings: Any, nvml: Any, *, worker: Any = None, state_path: str | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None):
        self.settings = settings           # core.config_gpu.GpuSettings
        self.budget_cfg = settings.budget()
        self.nvml = nvml                   # adapters.nvml.Nvml
        self.worker = worker               # daemon.worker_host.WorkerHost or None
        self.emit = emit or (lambda event: None)
        self.state_path = Path(state_path) if state_path else None
        self.daemon: Any = None            # set by bind(); its sessions are read, never changed
        self.snap = GpuSnapshot(absent_reason="not sampled yet")
        self.usage = GpuUsage()
        self.worker_stats: dict[str, Any] | None = None
        self.peaks: dict[str, int] = {}            # running call id -> highest sample
        self.declared: dict[str, tuple[int, int]] = {}   # call id -> (declared bytes, device)
        self.loans: dict[str, int] = self._load_loans()
        self.ended: set[str] = set()               # call ids whose loans are due back
        self.reported: dict[str, str] = {}         # call id -> last over-use report kind
        self.feedback: dict[str, list[dict[str, Any]]] = {}
        self.tickets: dict[str, list[tuple[str, int, int]]] = {}   # session -> admitted (pending id, bytes, dev)
        self._pending_n = 0
        self._samples = 0

    def bind(self, daemon: Any) -> None:
        self.daemon = daemon

    # -- persistence ----------------------------------------------------------------
    def _load_loans(self) -> dict[str, int]:
        if self.state_path is None:
            return {}
        try:
            data = json.loads(self.state_path.read_text())
            return {str(k): int(v) for k, v in data.get("loans", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("GPU state %s not read (%s): no loans", self.state_path, exc)
            return {}

    def _save(self) -> None:
        if self.state_path is not None:
            try:
                write_atomic(self.state_path, json.dumps({"loans": self.loans}))
            except OSError as exc:
                log.error("cannot write %s: %s", self.state_path, exc)

    # -- sampling ---------------------------------------------------------------------
    def _cg(self, path: Path) -> str:
        mount = getattr(self.daemon, "mount", None)
        return "/" + os.path.relpath(path, mount) if mount else str(path)

    def owners(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        if self.daemon is None:
            return out
        cgfs = self.daemon.cgfs
        for s in self.daemon.sessions.values():
            out[self._cg(cgfs.path(s.rel))] = ("session", s.name)
            for c in s.calls.values():
                out[self._cg(cgfs.path(c.rel))] = ("call", call_id(s.name, c.n))
        return out

    def running(self) -> list[RunningCall]:
        out = []
        for s in (self.daemon.sessions.values() if self.daemon else ()):
            for c in s.calls.values():
                cid = call_id(s.name, c.n)
                declared, dev = self.declared.get(cid, (c.intent.gpu_memory_bytes, 0))
                out.append(RunningCall(cid, s.name, declared, self.usage.by_call_bytes.get(cid, 0), dev))
        return out

    async def sample(self) -> None:
        """One NVML read (skipped for a while when NVML is absent), then the
        attribution, the peaks and the over-use checks."""
        self._samples += 1
        if self.snap.absent_reason is None or self._samples % ABSENT_RETRY_SAMPLES == 1:
            self.snap = await asyncio.to_thread(self.nvml.read)
        if self.worker is not None and self.worker.up:
            r = await self.worker.adapter.stats()
            self.worker_stats = r.result if r.ok else None
        if not self.snap.present:
            return
        pids = self.worker.pids() if self.worker is not None else []
        self.usage = attribute(self.snap.processes, self.owners(), pids)
        for cid, used in self.usage.by_call_bytes.items():
            self.peaks[cid] = max(self.peaks.get(cid, 0), used)
        await self._check(self.running())

    async def _check(self, running: list[RunningCall]) -> None:
        decisions = plan(BudgetInput(self.snap, None, (), tuple(running), (), {}), self.budget_cfg)
        for d in decisions:
            if isinstance(d, (OverUse, Undeclared, Kill)) and self.reported.get(d.call_id) != d.kind:
                if not isinstance(d, Kill):
                    self.reported[d.call_id] = d.kind
                self._report(d)

    def _report(self, d: Any) -> None:
        session, _, n = d.call_id.rpartition("/")
        s = self.daemon.sessions.get(session) if self.daemon else None
        c = s.calls.get(int(n)) if s and n.isdigit() else None
        log.warning("call %s: %s", d.call_id, d.reason)
        self.emit({"type": f"gpu.{d.kind}", "uid": s.uid if s else 0, "session": session,
                   "call": int(n) if n.isdigit() else n, "reason": d.reason})
        self.feedback.setdefault(d.call_id, []).append({"kind": f"gpu_{d.kind}", "message": d.reason})
        if isinstance(d, Kill) and c is not None:
            self.daemon.executor.kill(c.rel, f"gpu enforce=kill: {d.reason}")

    async def run(self, daemon: Any) -> None:
        self.bind(daemon)
        interval_s = self.settings.sample_interval_ms / 1000
        while True:
            try:
                await self.sample()
                await self._give_back()
            except Exception:  # one bad sample must not end the sampling
                log.exception("GPU sample failed")
            await asyncio.sleep(interval_s)

    # -- admission -----------------------------------------------------------------------
    async def admit_call(self, session: Any, intent: Any, msg: dict[str, Any]) -> None:
        need = intent.gpu_memory_bytes
        if need is None:
            return
        self._pending_n += 1
        pid_ = f"{session.name}/pending-{self._pending_n}"
        deadline = time.monotonic() + self.settings.admit_timeout_s
        why = "not planned yet"
        while True:
            self.snap = await asyncio.to_thread(self.nvml.read)
            pool = await self.worker.adapter.pool() if self.worker is not None and self.worker.up else None
            pc = PendingCall(pid_, session.name, need)
            ds = plan(BudgetInput(self.snap, pool, (pc,), tuple(self.running()), (), self.loans), self.budget_cfg)
            d = next((x for x in ds if x.call_id == pid_), None)
            why = d.reason if d else "no decision"
            if isinstance(d, Admit):
                log.info("call.start in %s admitted: %s", session.name, d.reason)
                self.tickets.setdefault(session.name, []).append((pid_, need, d.device_index))
                return
            if isinstance(d, Refuse):
                self._refuse(session, pid_, d.reason)
            if isinstance(d, Shrink):
                done, replies = await self.worker.adapter.apply_budget([d])
                self.loans = loans_after(self.loans, done)
                self._save()
                for r in replies:
                    line = f"KV pool shrink for a call of {session.name}: {d.reason}" + \
                        ("" if r.ok else f"; the worker refused: {r.message}")
                    log.info("%s", line)
                    self.emit({"type": "gpu.shrink", "uid": session.uid, "session": session.name,
                               "bytes": d.nbytes, "ok": r.ok, "reason": d.reason, "line": line})
            if time.monotonic() >= deadline:
                self._refuse(session, pid_, f"waited {self.settings.admit_timeout_s:g} s: {why}")
            await asyncio.sleep(ADMIT_POLL_S)

    def _refuse(self, session: Any, pending_id: str, why: str) -> None:
        if pending_id in self.loans:
            self.ended.add(pending_id)    # the pool's bytes come back at the next sample
        raise p.ProtocolError(p.E_OVER_GRANT, f"gpu_memory: {why}")

    async def _give_back(self) -> None:
        due = [cid for cid in self.loans if cid in self.ended or not self._alive(cid)]
        if not due or self.worker is None or not self.worker.up:
            return
        ds = plan(BudgetInput(self.snap, None, (), (), tuple(due), self.loans), self.budget_cfg)
        done, replies = await self.worker.adapter.apply_budget(ds)
        self.loans = loans_after(self.loans, done)
        for d in done:
            self.ended.discard(d.call_id)
            log.info("%s", d.reason)
            self.emit({"type": "gpu.grow", "uid": 0, "call": d.call_id, "bytes": d.nbytes, "reason": d.reason})
        self._save()

    def _alive(self, cid: str) -> bool:
        session, _, n = cid.rpartition("/")
        s = self.daemon.sessions.get(session) if self.daemon else None
        if s is None:
            return False
        if n.startswith("pending-"):
            return True
        return n.isdigit() and int(n) in s.calls

    # -- hook methods ------------------------------------------------------------------
    def on_call_start(self, session: Any, call: Any, path: Path) -> None:
        cid = call_id(session.name, call.n)
        need = call.intent.gpu_memory_bytes
        tickets = self.tickets.get(session.name, [])
        t = next((t for t in tickets if t[1] == need), None)
        if t is not None:
            tickets.remove(t)
            self.declared[cid] = (need, t[2])
            if t[0] in self.loans:              # the loan follows the call
                self.loans[cid] = self.loans.pop(t[0])
                self._save()

    def on_call_end(self, session: Any, call: Any, path: Path) -> dict[str, Any]:
        cid = call_id(session.name, call.n)
        peak = self.peaks.pop(cid, None)
        self.declared.pop(cid, None)
        self.reported.pop(cid, None)
        extra: dict[str, Any] = {"gpu_memory_peak_bytes": peak if self.snap.present else None}
        if not self.snap.present:
            extra["gpu_absent_reason"] = self.snap.absent_reason
        fb = self.feedback.pop(cid, None)
        if fb:
            extra["gpu_feedback"] = fb
        if cid in self.loans:
            self.ended.add(cid)
            try:
                asyncio.get_running_loop().create_task(self._give_back())
            except RuntimeError:
                pass
        return extra

    def session_view(self, session: Any) -> dict[str, Any]:
        """GPU memory of one session for `session show`."""
        prefix = session.name + "/"
        calls = sum(v for k, v in self.usage.by_call_bytes.items() if k.startswith(prefix))
        kv = ((self.worker_stats or {}).get("sessions") or {}).get(session.name)
        bb = int((self.worker_stats or {}).get("block_bytes", 0))
        return {"gpu": {
            "memory_bytes": (calls + self.usage.by_session_bytes.get(session.name, 0)) if self.snap.present else None,
            "absent_reason": self.snap.absent_reason,
            "worker_kv_device_bytes": kv["blocks_gpu"] * bb if kv else 0,
            "worker_kv_host_bytes": kv["blocks_host"] * bb if kv else 0,
            "worker_kv_where": kv["where"] if kv else "none"}}

    def status(self) -> dict[str, Any]:
        snap = self.snap
        out: dict[str, Any] = {"nvml": "present" if snap.present else "absent",
                               "absent_reason": snap.absent_reason}
        if snap.present:
            out["devices"] = [{"index": d.index, "name": d.name, "total_bytes": d.total_bytes,
                               "used_bytes": d.used_bytes, "free_bytes": d.free_bytes} for d in snap.devices]
            out["by_session_bytes"] = self._by_session()
            out["worker_bytes"] = self.usage.worker_bytes
            out["other_bytes"] = self.usage.other_bytes
        if snap.errors:
            out["errors"] = list(snap.errors)
        out["loans"] = {k: format_bytes(v) for k, v in self.loans.items()}
        out["enforce"] = self.budget_cfg.enforce
        return out

    def _by_session(self) -> dict[str, int]:
        out = dict(self.usage.by_session_bytes)
        for cid, used in self.usage.by_call_bytes.items():
            s = cid.rpartition("/")[0]
            out[s] = out.get(s, 0) + used
        return out

    def close(self) -> None:
        self._save()
        close = getattr(self.nvml, "close", None)
        if close is not None:
            close()


def add_gpu_hooks(config: Any, cgfs: Any, executor: Any, hooks: Any) -> Callable[[Any], None]:
    """Register the worker supervisor, the KV placer and the GPU coordinator
    that the [worker] and [gpu] tables ask for; -> bind(daemon), to call once
    the daemon exists (they emit its events and read its sessions)."""
    from agentcg.adapters.nvml import Nvml

    from .kv import KvPlacer
    from .worker_host import WorkerHost
    runtime = config.daemon.runtime_dir.rstrip("/")
    worker = kv = gpu = None
    if config.worker.enabled:
        worker = WorkerHost(config.worker, cgfs, runtime, executor=executor)
        kv = KvPlacer(worker, config.gpu.placement(), f"{runtime}/durations.json")
        hooks.add(worker)
        hooks.add(kv)
    if config.gpu.enabled:
        gpu = GpuCoordinator(config.gpu, Nvml(), worker=worker, state_path=f"{runtime}/gpu.json")
        hooks.add(gpu)

    def bind(daemon: Any) -> None:
        for h in (worker, kv, gpu):
            if h is not None:
                h.emit = daemon.emit
        if gpu is not None:
            gpu.bind(daemon)
    return bind
