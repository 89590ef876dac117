"""The daemon's core: its sessions and calls, and the service API that the
protocol handlers (daemon/handlers.py) and automatic mode
(daemon/automatic.py) both use.

The service API takes checked values, never a protocol message or a peer:

    create_session(name, *, uid, intent, by_uid) -> (SessionRecord, skipped files)
    attach_agent(session, pid) -> the agent cgroup's path
    end_session(session, *, by_uid) -> summary
    start_call(session, *, pid, name, argv, intent, placement, conn, token) -> Started
    call_started(session, call, pid, *, inside) -> "clone_into" | "pid"
    end_call(session, call, *, exit_status, reason, force_kill) -> result
    place_in_call(session, n, pid) -> bool
    status(uid) -> dict

Who may do what (the pid rule, session ownership) is the handlers' to check.
The call cgroups themselves (spares, stragglers, removal, oom preference)
are `CallPool`'s (daemon/calls.py), events `EventLog`'s (daemon/events.py),
restore `restore()`'s (daemon/restore.py). The socket server is daemon/app.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg import protocol as p
from agentcg.adapters.cgroupfs import CgroupFs, pid_cgroup
from agentcg.adapters.executor import Executor
from agentcg.adapters.procfs import read_oom_score_adj
from agentcg.core.config import Config
from agentcg.core.feedback import feedback
from agentcg.core.intents import Intent, call_limits, session_limits, with_grant_priority
from agentcg.core.model import CallStats

from .calls import CallPool
from .events import EventLog
from .handlers import Handlers
from .hooks import Hooks
from .restore import kept_results, restore
from .state import CallRecord, Journal, SessionRecord, state_json, write_atomic

log = logging.getLogger("agentcg.daemon")

# journal lines after which the state file is rewritten (after a reply) and the journal emptied
JOURNAL_COMPACT_LINES = 1000


@dataclass
class Started:
    """What start_call did: the call, how its intent was fitted into the
    session's limits, the limit files this kernel lacks, and for clone_into
    an fd of the call cgroup (the caller closes it)."""
    call: CallRecord
    adjustments: list[Any] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    fd: int | None = None
    resent: bool = False


class Daemon(Handlers):
    def __init__(self, config: Config, cgfs: CgroupFs, hooks: Hooks, *, mount: str | None = None,
                 hierarchy: dict[str, Any] | None = None, journal: Journal | None = None,
                 events: EventLog | None = None, executor: Executor | None = None):
        self.config = config
        self.cfg = config.daemon
        self.cgfs = cgfs
        self.hooks = hooks
        self.mount = mount
        self.hierarchy = hierarchy or {}
        self.sessions: dict[str, SessionRecord] = {}
        self.finished: dict[tuple[str, int], dict[str, Any]] = {}
        self.started_time = time.time()
        self.own_pid = os.getpid()
        self.enabled_controllers: set[str] = set()
        self._finalising: set[tuple[str, int]] = set()
        self._starting: dict[tuple[str, int], str] = {}  # clone_into calls whose hooks run after the reply
        # the one writer of the tree: limits, moves, kills, OOM preference (and the policy's writes)
        self.executor = executor or Executor(cgfs)
        self.calls = CallPool(self.cfg, cgfs, self.executor, mount, self.sessions.get)
        self.events = events or EventLog(self.cfg.event_log_file)
        self.journal = journal or Journal(self.cfg.state_file)
        self._compacting = False

    # -- work after the reply ------------------------------------------------
    @staticmethod
    def later(fn: Any, *args: Any) -> None:
        """Run fn(*args) once the current reply is written (the next turn of
        the event loop, before the next request is read); at once when no
        loop runs (unit tests)."""
        try:
            asyncio.get_running_loop().call_soon(fn, *args)
        except RuntimeError:
            fn(*args)

    # -- persistence & events ----------------------------------------------
    def save(self) -> None:
        """Rewrite the state file (sessions and their running calls) and
        empty the journal, before a reply that changed a session goes out,
        so that a crash right after it loses nothing."""
        try:
            write_atomic(self.cfg.state_file, state_json(str(self.cgfs.root), self.sessions,
                                                         kept_results(self.finished, self.sessions)))
        except OSError as exc:
            log.error("cannot write state file %s: %s", self.cfg.state_file, exc)
            return
        try:
            self.journal.truncate()
        except OSError as exc:
            log.error("cannot empty the journal %s: %s", self.journal.path, exc)

    def record(self, entry: dict[str, Any]) -> None:
        """A call's start, pid or end: one line appended to the journal before
        the reply (see daemon/state.py), instead of rewriting the state file.
        Every JOURNAL_COMPACT_LINES the state file is rewritten after the reply."""
        try:
            self.journal.append(entry)
        except OSError as exc:
            log.error("cannot append to the journal %s: %s; writing the state file", self.journal.path, exc)
            self.save()
            return
        if self.journal.lines >= JOURNAL_COMPACT_LINES and not self._compacting:
            self._compacting = True
            self.later(self._compact)

    def _compact(self) -> None:
        self._compacting = False
        self.save()

    def emit(self, event: dict[str, Any]) -> None:
        self.events.emit(event)

    def restore(self) -> dict[str, int]:
        """Rebuild from the state file and the cgroup tree after a restart."""
        return restore(self)

    # -- service API: the daemon and its sessions ---------------------------------------
    def status(self, uid: int | None) -> dict[str, Any]:
        """The daemon's status as seen by uid (None: root, every session)."""
        mine = [s for s in self.sessions.values() if uid is None or s.uid == uid]
        return {"daemon": {"pid": self.own_pid, "version": 1, "cgroup_root": str(self.cgfs.root),
                           "uptime_s": round(time.time() - self.started_time, 3),
                           "controllers": sorted(self.enabled_controllers),
                           "hierarchy": self.hierarchy,
                           "straggler_policy": self.cfg.straggler_policy},
                "sessions": len(mine),
                "running_calls": sum(len(s.calls) for s in mine),
                "hooks": self.hooks.status()}

    def session_view(self, s: SessionRecord) -> dict[str, Any]:
        return {"name": s.name, "uid": s.uid, "intent": s.intent.to_dict(), "limits": s.limits.to_dict(),
                "cgroup": str(self.cgfs.path(s.rel)), "created_time": s.created_time,
                "running_calls": len(s.calls), "calls_done": s.calls_done,
                "agent_pids": self.cgfs.procs(f"{s.rel}/agent")}

    def create_session(self, name: str, *, uid: int, intent: Intent,
                       by_uid: int) -> tuple[SessionRecord, list[str]]:
        """A new session of uid `uid`, its intent merged with the defaults and
        capped by uid's grant: the cgroup, its limits and its agent leaf."""
        grant = self.config.grant_for(uid)
        if grant.max_sessions is not None and \
                sum(1 for s in self.sessions.values() if s.uid == uid) >= grant.max_sessions:
            raise p.ProtocolError(p.E_OVER_GRANT, f"max_sessions: uid {uid} already has "
                                                  f"{grant.max_sessions} sessions")
        intent = with_grant_priority(intent.over(self.config.session_defaults), grant)
        limits = session_limits(intent, grant, uid)
        s = SessionRecord(name=name, uid=uid, intent=intent, limits=limits, created_time=time.time())
        self.cgfs.create(s.rel)
        try:
            self.executor.enable_controllers(s.rel, self.enabled_controllers)
            res = self.executor.apply_limits(s.rel, limits.files(), f"session {name} intent {intent.describe()}")
            self.cgfs.create(f"{s.rel}/agent")
        except OSError as exc:
            self.cgfs.remove_tree(s.rel)
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {s.rel}: {exc}") from None
        self.sessions[name] = s
        self.save()
        self.hooks.session_create(s, self.cgfs.path(s.rel))
        self.later(self.calls.refill, name)
        self.emit({"type": "session.create", "uid": uid, "session": name, "by_uid": by_uid,
                   "intent": intent.to_dict(), "limits": limits.to_dict()})
        return s, res["skipped"]

    def attach_agent(self, s: SessionRecord, pid: int) -> Path:
        """Move agent process pid into the session's agent leaf, protected
        from the OOM killer first; where it came from is kept for end_session."""
        origin = pid_cgroup(pid) or "/"
        # protected before it enters the budget: at a full budget the OOM killer
        # must never find it there at its old value
        old_adj = read_oom_score_adj(pid)
        self.calls.oom_prefer(pid, "agent")
        try:
            self.executor.place(f"{s.rel}/agent", pid)
        except ProcessLookupError:
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited") from None
        except OSError:
            if old_adj is not None and self.mount is not None:
                self.executor.oom_score_adj(pid, old_adj)  # not attached: not protected either
            raise
        s.attached[pid] = origin
        self.save()
        self.emit({"type": "session.attach", "uid": s.uid, "session": s.name, "pid": pid})
        return self.cgfs.path(f"{s.rel}/agent")

    async def end_session(self, s: SessionRecord, *, by_uid: int) -> dict[str, Any]:
        """Kill the session's running calls, move its agents back where they
        came from, remove its cgroup."""
        ended = []
        for c in list(s.calls.values()):
            ended.append(await self.end_call(s, c, exit_status=None, reason="session ended", force_kill=True))
        moved = self._move_agents_back(s)
        self.hooks.session_end(s, self.cgfs.path(s.rel))
        self.calls.drop_spares(s.name)
        removed = self.cgfs.remove_tree(s.rel)
        self.executor.forget(s.rel)
        del self.sessions[s.name]
        self.save()
        self.emit({"type": "session.end", "uid": s.uid, "session": s.name, "by_uid": by_uid,
                   "calls_done": s.calls_done, "removed": removed})
        return {"session": s.name, "removed": removed, "calls_ended": len(ended), "agent_pids_moved": moved}

    def _move_agents_back(self, s: SessionRecord) -> int:
        """The agent's own processes go back where they came from; how many moved."""
        moved = 0
        if not self.mount:
            return moved
        for pid in self.cgfs.procs(f"{s.rel}/agent"):
            origin = s.attached.get(pid, "/")
            target = Path(self.mount + origin) if origin != "/" else Path(self.mount)
            if not target.is_dir():
                target = Path(self.mount)
            try:
                self.executor.place_at(target, pid)
                moved += 1
            except OSError as exc:
                log.warning("cannot move agent pid %d back to %s: %s", pid, target, exc)
        return moved

    # -- service API: tool calls ---------------------------------------------------------------
    def start_call(self, s: SessionRecord, *, pid: int, name: str, argv: list[str], intent: Intent,
                   placement: str = "pid", conn: int | None = None, token: str = "") -> Started:
        """A new tool call in session s: its intent merged with the defaults
        and fitted into the session's limits, its cgroup taken from the pool,
        journaled, and pid placed in it (placement "pid"; "clone_into": an fd
        of the cgroup instead, the pid comes with call_started). A `token`
        seen before is a resend after a restart: the same call, never a second."""
        intent = intent.over(self.config.call_defaults)
        limits, adjustments = call_limits(intent, s.limits)
        again = next((c for c in s.calls.values() if token and c.token == token), None)
        if again is not None:
            return self._start_again(s, again, placement, pid, conn, adjustments)
        n = self.calls.take(s)
        c = CallRecord(session=s.name, n=n, name=name, uid=s.uid, pid=pid, intent=intent, limits=limits,
                       start_ns=time.monotonic_ns(), start_time=time.time(),
                       argv=argv[:64], conn=conn, token=token)
        fd = None
        try:
            res = self.executor.apply_limits(c.rel, limits.files(),
                                         f"call {name or n} intent {intent.describe() or '(defaults)'}")
            # journaled before the pid is placed and the reply: restore must tell a
            # started call from an empty spare even if the tool ran and exited while
            # the daemon was down, and a resent call.start finds its call, not a stray
            s.calls[n] = c
            self.record({"op": "start", "call": c.to_dict()})
            if placement == "pid":
                self.executor.place(c.rel, pid)
                self.calls.oom_prefer(pid, "call", s)
            else:
                fd = self.cgfs.open_dir(c.rel)
        except ProcessLookupError:
            self._abort_start(s, c)
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
        except OSError as exc:
            self._abort_start(s, c)
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {c.rel}: {exc}") from None
        self.later(self.calls.refill, s.name)
        started = Started(c, adjustments, res["skipped"], fd)
        if fd is None:
            self.hooks.call_start(s, c, self.cgfs.path(c.rel))
            self.emit({"type": "call.start", "uid": s.uid, "session": s.name, "call": n, "name": name,
                       "pid": pid, "intent": intent.to_dict(), "limits": limits.to_dict()})
        # else: hooks and the event wait for call.started, which names the pid
        return started

    def _abort_start(self, s: SessionRecord, c: CallRecord) -> None:
        if s.calls.pop(c.n, None) is not None:
            self.record({"op": "drop", "session": s.name, "n": c.n})
        self.calls.forget_fds(c.rel)
        self.cgfs.remove(c.rel)

    def _start_again(self, s: SessionRecord, c: CallRecord, placement: str, pid: int, conn: int | None,
                     adjustments: list[Any]) -> Started:
        """A call.start whose first reply was lost in a restart: its pid
        placed if it is not yet (the crash came before), or a fresh fd of
        its cgroup for clone_into."""
        fd = None
        try:
            if placement == "pid":
                if not self.calls.in_cgroup(pid, c.rel):
                    self.executor.place(c.rel, pid)
                    self.calls.oom_prefer(pid, "call", s)
                c.pid = pid
            else:
                fd = self.cgfs.open_dir(c.rel)
        except ProcessLookupError:
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
        except OSError as exc:
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {c.rel}: {exc}") from None
        c.conn, c.reconnect_until_ns = conn, 0
        return Started(c, adjustments, [], fd, resent=True)

    def call_started(self, s: SessionRecord, c: CallRecord, pid: int, *, inside: bool) -> str:
        """The pid of a clone_into call: placed now unless it is `inside`
        already (born there). Returns how it got there. The hooks and the
        call.start event follow after the reply."""
        placed = "clone_into"
        if not inside:
            try:
                self.executor.place(c.rel, pid)
            except ProcessLookupError:
                raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
            except OSError as exc:
                raise p.ProtocolError(p.E_CGROUP, f"cannot place pid {pid} in {c.rel}: {exc}") from None
            placed = "pid"
        self.calls.oom_prefer(pid, "call", s)  # for clients that do not set it in the child
        c.pid = pid
        # the child runs already: the hooks see the call after this reply
        self._starting[(s.name, c.n)] = placed
        self.later(self._call_started, s.name, c.n)
        return placed

    def _call_started(self, name: str, n: int) -> None:
        """The call.start hooks and event of a clone_into call (after the
        call.started reply, or first thing at its end if that came sooner)."""
        placed = self._starting.pop((name, n), None)
        if placed is None:
            return
        s = self.sessions.get(name)
        c = s.calls.get(n) if s is not None else None
        if c is None:
            return
        self.record({"op": "pid", "session": s.name, "n": n, "pid": c.pid})
        self.hooks.call_start(s, c, self.cgfs.path(c.rel))
        self.emit({"type": "call.start", "uid": s.uid, "session": s.name, "call": n, "name": c.name,
                   "pid": c.pid, "placement": placed, "intent": c.intent.to_dict(),
                   "limits": c.limits.to_dict()})

    def place_in_call(self, s: SessionRecord, n: int, pid: int) -> bool:
        """Move one more process into running call n (automatic mode: one the
        agent forked before the call's root was placed); False if it is gone."""
        try:
            self.executor.place(f"{s.rel}/c-{n}", pid)
            self.calls.oom_prefer(pid, "call", s)
        except (ProcessLookupError, FileNotFoundError, OSError):
            return False
        return True

    async def end_call(self, s: SessionRecord, c: CallRecord, *, exit_status: int | None,
                       reason: str, force_kill: bool = False) -> dict[str, Any]:
        """End a call: its stragglers reaped, its stats and feedback, the
        result journaled and emitted, its cgroup removed after the reply.
        A second end of the same call waits for the first and gets its result."""
        key = (s.name, c.n)
        while key in self._finalising:          # a concurrent end of the same call
            await asyncio.sleep(0.01)
            if key in self.finished:
                return self.finished[key]
        self._finalising.add(key)
        try:
            return await self._end_call(s, c, exit_status=exit_status, reason=reason, force_kill=force_kill)
        finally:
            self._finalising.discard(key)

    async def _end_call(self, s: SessionRecord, c: CallRecord, *, exit_status: int | None,
                        reason: str, force_kill: bool) -> dict[str, Any]:
        if (s.name, c.n) in self._starting:
            self._call_started(s.name, c.n)
        rel = c.rel
        stragglers, action = await self.calls.reap(rel, c.n, reason, force_kill=force_kill)
        raw = self.cgfs.read_stats(rel, self.calls.fds(rel))
        wall_ns = time.monotonic_ns() - c.start_ns
        extra = self.hooks.call_end(s, c, self.cgfs.path(rel))
        stats = CallStats(wall_ns=wall_ns, stragglers=stragglers, stragglers_action=action, extra=extra,
                          **{k: v for k, v in raw.items() if k in CallStats.__dataclass_fields__})
        items = feedback(stats, c.limits, argv=c.argv, duration_ns=c.intent.duration_ns)
        removed = action != "kept"   # rmdir right after the reply (remove_ended)
        if action == "kept":
            log.info("call %s kept with %d processes; removed when they exit", rel, stragglers)
        s.calls.pop(c.n, None)
        s.calls_done += 1
        result = {"session": s.name, "call": c.n, "name": c.name, "uid": c.uid, "exit_status": exit_status,
                  "stats": stats.to_dict(), "limits": c.limits.to_dict(),
                  "feedback": [f.to_dict() for f in items], "cgroup_removed": removed, "reason": reason}
        # the result survives a restart; nothing awaits between this line and the
        # event, so that restore can tell whether the event was written (restore.py)
        self.record({"op": "end", "session": s.name, "n": c.n, "done": s.calls_done, "result": result,
                     "log_bytes": self.events.size_bytes()})
        self.finished[(s.name, c.n)] = result
        while len(self.finished) > self.cfg.finished_keep:
            self.finished.pop(next(iter(self.finished)))
        if action == "kept":
            self.calls.keep(rel)
        else:
            self.later(self.calls.remove_ended, rel)
        self.emit({"type": "call.end", **result})
        return result

    # -- background watch --------------------------------------------------------------
    def connection_closed(self, conn: int) -> None:
        for s in self.sessions.values():
            for c in s.calls.values():
                if c.conn == conn:
                    c.conn = None

    async def watch(self) -> None:
        """End calls whose client is gone once their processes are gone,
        and remove kept cgroups once their stragglers exit."""
        interval = max(0.05, self.cfg.watch_interval_ms / 1000)
        while True:
            await asyncio.sleep(interval)
            try:
                now_ns = time.monotonic_ns()
                for s in list(self.sessions.values()):
                    for c in list(s.calls.values()):
                        if c.conn is None and c.reconnect_until_ns <= now_ns and \
                                not self.cgfs.populated(c.rel, self.calls.fds(c.rel)):
                            await self.end_call(s, c, exit_status=None, reason="processes exited; client gone")
                self.calls.sweep()
            except Exception:
                log.exception("watch pass failed")

    async def teardown(self) -> None:
        """Kill every tool call and remove the whole tree (agentcgd --teardown)."""
        for s in list(self.sessions.values()):
            for c in list(s.calls.values()):
                await self.end_call(s, c, exit_status=None, reason="daemon teardown", force_kill=True)
            if self.cgfs.populated(s.rel):
                self.executor.kill(s.rel, "daemon teardown")
                self.cgfs.wait_unpopulated(s.rel, 5.0)
            self.calls.drop_spares(s.name)
            self.cgfs.remove_tree(s.rel)
            del self.sessions[s.name]
        self.save()
