"""KV placement on tool-call events: keep, swap or drop a session's context
in the inference worker while its agent runs a tool call.

A session ties to the worker's session of the same name: the agent's LLM
requests carry `X-Agentcg-Session: <session>` (`Session.llm_headers()` in
agentcg.client). At the first call.start of a session whose context the
worker holds, the expected duration (the intent's `duration`, else this
command's history in the session, then on the host: core/durations.py) and
the worker's `stats` go to core/kv_placement.py, and its mode is sent as
`suspend`. When the session's last running call ends, `resume` is sent at
once, so the worker brings the context back ahead of the agent's next
request (a request that comes earlier swaps it in itself).

Each decision is logged old -> new with its reason and emitted as a `gpu.kv`
event. The duration history is kept in <runtime_dir>/durations.json.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from agentcg.core.durations import Durations
from agentcg.core.intents import PRIORITY_DEFAULT
from agentcg.core.kv_placement import PlacementConfig, PlacementInput, on_call_end, place

from .state import write_atomic

log = logging.getLogger("agentcg.daemon.kv")
RECENT = 20


def _where(stats: dict[str, Any] | None, session: str) -> str:
    s = (stats or {}).get("sessions", {}).get(session)
    return s.get("where", "none") if s else "none"


class KvPlacer:
    """A hook: suspend at a session's first running call, resume at its last."""

    name = "kv"

    def __init__(self, worker: Any, cfg: PlacementConfig, durations_path: str, *,
                 emit: Callable[[dict[str, Any]], None] | None = None):
        self.worker = worker               # daemon.worker_host.WorkerHost (adapter, up)
        self.cfg = cfg
        self.path = Path(durations_path)
        self.emit = emit or (lambda event: None)
        self.durations = self._load()
        self.running: dict[str, int] = {}          # session -> its running calls
        self.modes: dict[str, str] = {}            # session -> the suspend mode in force
        self.tasks: dict[str, asyncio.Task] = {}   # session -> its last worker op (kept in order)
        self.recent: list[dict[str, Any]] = []
        self._save_pending = False

    # -- durations, persisted -------------------------------------------------------
    def _load(self) -> Durations:
        try:
            return Durations.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return Durations()
        except (OSError, ValueError) as exc:
            log.warning("duration history %s not read (%s): starting empty", self.path, exc)
            return Durations()

    def save(self) -> None:
        self._save_pending = False
        try:
            write_atomic(self.path, json.dumps(self.durations.to_dict(), separators=(",", ":")))
        except OSError as exc:
            log.error("cannot write the duration history %s: %s", self.path, exc)

    def _save_later(self) -> None:
        if self._save_pending:
            return
        self._save_pending = True
        try:
            asyncio.get_running_loop().call_later(1.0, self.save)
        except RuntimeError:
            self.save()

    # -- hook methods -----------------------------------------------------------------
    def on_call_start(self, session: Any, call: Any, path: Path) -> None:
        name = session.name
        self.running[name] = self.running.get(name, 0) + 1
        if self.running[name] > 1 or not self.worker.up:
            return   # the first call decided; the context stays where it is until the last ends
        est = self.durations.estimate(name, call.argv or call.name,
                                      None if call.intent.duration_ns is None else call.intent.duration_ns / 1e9)
        prio = session.intent.priority if session.intent.priority is not None else PRIORITY_DEFAULT
        self._chain(name, self._suspend(session, call, est, prio))

    def on_call_end(self, session: Any, call: Any, path: Path) -> dict[str, Any]:
        name = session.name
        wall_s = (time.monotonic_ns() - call.start_ns) / 1e9
        try:
            self.durations.record(name, call.argv or call.name, wall_s)
            self._save_later()
        except ValueError:
            pass
        left = self.running.get(name, 0) - 1
        if left > 0:
            self.running[name] = left
            return {}
        self.running.pop(name, None)
        mode = self.modes.pop(name, None)
        if mode is not None or name in self.tasks:
            self._chain(name, self._resume(session, call, mode))
        return {"kv_placement": mode} if mode else {}

    def on_session_end(self, session: Any, path: Path) -> None:
        self.durations.forget_session(session.name)
        self.modes.pop(session.name, None)

    def status(self) -> dict[str, Any]:
        return {"suspended": dict(self.modes), "commands_known": len(self.durations.host),
                "last_decisions": self.recent[-5:]}

    def close(self) -> None:
        if self._save_pending:
            self.save()

    # -- the worker ops, one after the other per session -------------------------------
    def _chain(self, name: str, coro: Any) -> None:
        prev = self.tasks.get(name)

        async def after() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            await coro

        try:
            task = asyncio.get_running_loop().create_task(after())
        except RuntimeError:   # no loop (a test calling the hook directly)
            coro.close()
            return
        self.tasks[name] = task
        task.add_done_callback(lambda t, n=name: self.tasks.pop(n, None) if self.tasks.get(n) is t else None)

    def _note(self, session: Any, call: Any, event: dict[str, Any]) -> None:
        event = {"type": "gpu.kv", "uid": session.uid, "session": session.name, "call": call.n, **event}
        self.recent = (self.recent + [event])[-RECENT:]
        self.emit(event)

    async def _suspend(self, session: Any, call: Any, est: Any, prio: int) -> None:
        adapter = self.worker.adapter
        r = await adapter.stats()
        if not r.ok or session.name not in r.result.get("sessions", {}):
            return   # no context in the worker for this session: nothing to place
        inp = PlacementInput.from_worker_stats(r.result, session.name, expected_duration_s=est.duration_s,
                                               priority=prio)
        p = place(inp, self.cfg)
        old = _where(r.result, session.name)
        reply = await adapter.apply_placement(session.name, p)
        new = (reply.result or {}).get("where", old) if reply.ok else old
        if reply.ok:
            self.modes[session.name] = p.mode
        line = (f"kv {session.name}: {old} -> {new} ({p.mode}: {p.reason}; expected duration from "
                f"{est.source}: {est.reason})")
        if not reply.ok:
            line += f"; the worker refused: {reply.message}"
        log.info("%s", line)
        self._note(session, call, {"op": "suspend", "mode": p.mode, "old": old, "new": new, "ok": reply.ok,
                                   "reason": p.reason, "expected_s": round(est.duration_s, 3),
                                   "expected_from": est.source, "line": line,
                                   **({"error": reply.message} if not reply.ok else {})})

    async def _resume(self, session: Any, call: Any, mode: str | None) -> None:
        mode = mode or self.modes.pop(session.name, None)
        if mode is None:
            return
        end = on_call_end(mode)
        reply = await self.worker.adapter.apply_end(session.name, end)
        if reply is None:
            return
        new = (reply.result or {}).get("where", "?") if reply.ok else "?"
        line = f"kv {session.name}: {mode} -> {new} (resume: {end.reason})"
        if not reply.ok:
            line += f"; the worker refused: {reply.message}"
        log.info("%s", line)
        self._note(session, call, {"op": "resume", "mode": mode, "new": new, "ok": reply.ok,
                                   "reason": end.reason, "line": line,
                                   **({"error": reply.message} if not reply.ok else {})})
