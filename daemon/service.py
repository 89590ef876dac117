"""The daemon's request handlers, accounting and restore.

`Daemon` holds the sessions and calls, answers protocol requests for one peer
(`Peer`: pid, uid, gid from SO_PEERCRED), writes the cgroup tree through the
cgroupfs adapter, and finalises tool calls: stats, stragglers, feedback,
event log. The socket server lives in daemon/app.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from agentcg import protocol as p
from agentcg.adapters.cgroupfs import CgroupFs, CgroupGone, pid_cgroup
from agentcg.adapters.procfs import proc_status, read_oom_score_adj, set_oom_score_adj
from agentcg.core.config import Config
from agentcg.core.feedback import feedback
from agentcg.core.intents import (BudgetError, Intent, IntentError, call_limits,
                                  session_limits, with_grant_priority)
from agentcg.core.model import SESSION_NAME_RE, CallStats, Limits

from .hooks import Hooks
from .restart import RESTORED_CALL_GRACE_S, end_logged, kept_results
from .state import (CallRecord, Journal, SessionRecord, load_state, open_private, state_json,
                    write_atomic)

log = logging.getLogger("agentcg.daemon")

CALL_DIR_RE = re.compile(r"^c-(\d+)$")
PLACEMENTS = ("pid", "clone_into")
# call cgroups made ahead per session, after a reply (cgroup2 cannot rename a
# directory, so a spare is made under the number of the next call: c-<n>)
SPARE_CALL_CGROUPS = 1
# journal lines after which the state file is rewritten (after a reply) and the journal emptied
JOURNAL_COMPACT_LINES = 1000


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    conn: int = 0

    @property
    def root(self) -> bool:
        return self.uid == 0


def check_pid(pid: Any, peer: Peer, *, child_only: bool, own_pid: int) -> None:
    """The pid rule: a non-root caller may only place its own processes
    (real, effective, saved and filesystem uid all the caller's: a setuid
    program that dropped its privileges for a while keeps root as its saved
    uid and is not the caller's to freeze or kill through a cgroup), and for
    a tool call only itself or its direct child. Root may place any process
    but the daemon."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise p.ProtocolError(p.E_BAD_REQUEST, f"pid: {pid!r} is not a process id")
    if pid == own_pid:
        raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} is the daemon itself")
    st = proc_status(pid)
    if st is None:
        raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} does not exist")
    if peer.root:
        return
    uids = st.get("Uid", "").split()
    if len(uids) != 4 or any(int(u) != peer.uid for u in uids):
        raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} does not belong to uid {peer.uid}")
    if child_only and pid != peer.pid and int(st.get("PPid", "-1")) != peer.pid:
        raise p.ProtocolError(p.E_BAD_PID,
                              f"pid: {pid} is neither the caller ({peer.pid}) nor its child")


class Daemon:
    def __init__(self, config: Config, cgfs: CgroupFs, hooks: Hooks, *, mount: str | None = None,
                 hierarchy: dict[str, Any] | None = None):
        self.config = config
        self.cfg = config.daemon
        self.cgfs = cgfs
        self.hooks = hooks
        self.mount = mount
        self.hierarchy = hierarchy or {}
        self.sessions: dict[str, SessionRecord] = {}
        self.finished: dict[tuple[str, int], dict[str, Any]] = {}
        self.subscribers: list[tuple[Peer, asyncio.Queue]] = []
        self.started_time = time.time()
        self.own_pid = os.getpid()
        self.enabled_controllers: set[str] = set()
        self._finalising: set[tuple[str, int]] = set()
        self.lingering: set[str] = set()        # kept call cgroups waiting for their stragglers
        # session -> numbers n of the empty c-<n> made ahead
        self.spares: dict[str, list[int]] = {}
        self._starting: dict[tuple[str, int], str] = {}  # clone_into calls whose hooks run after the reply
        self._log_f = None
        self.journal = Journal(self.cfg.state_file)
        self._compacting = False
        self._stat_fds: dict[str, dict[str, int]] = {}   # call cgroup -> its accounting files, opened ahead

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

    def _mkdir(self, rel: str) -> bool:
        """Make a spare call cgroup and open its accounting files (the call's
        end then reads each with one pread); False if it cannot be made."""
        try:
            self.cgfs.create(rel)
            self._call_oom_group(rel)
        except OSError as exc:
            log.warning("cannot make a spare call cgroup %s: %s", rel, exc)
            return False
        fds = self.cgfs.open_stats(rel)
        if fds is not None:
            self._stat_fds[rel] = fds
        return True

    def refill_spares(self, name: str) -> None:
        """Make the session's next call cgroup ahead, after the reply that
        took the last one (on the loop: the client is starting its command
        meanwhile; a hop to a worker thread and back costs more than the
        mkdir). A crash leaves at most an empty c-<n> without a record:
        restore removes it."""
        s = self.sessions.get(name)
        if s is None:
            return
        spares = self.spares.setdefault(name, [])
        while len(spares) < SPARE_CALL_CGROUPS:
            n = s.next_call
            if not self._mkdir(f"{s.rel}/c-{n}"):
                return            # made at call.start instead
            s.next_call = n + 1
            spares.append(n)

    def _drop_spares(self, name: str) -> None:
        s = self.sessions.get(name)
        for n in self.spares.pop(name, []):
            if s is not None:
                self._forget_fds(f"{s.rel}/c-{n}")

    def remove_ended(self, rel: str) -> None:
        """rmdir an ended call's cgroup after its reply went out (on the loop:
        an rmdir of an empty cgroup costs less than a hop to the worker thread
        and back; the kernel frees the cgroup's state asynchronously)."""
        self.cgfs.close_fds(self._stat_fds.pop(rel, None))
        try:
            ok = self.cgfs.remove(rel)
        except OSError as exc:
            log.warning("cannot remove %s: %s; retrying", rel, exc)
            ok = False
        if not ok:
            self.lingering.add(rel)   # busy: the watch retries

    def _forget_fds(self, rel: str) -> None:
        self.cgfs.close_fds(self._stat_fds.pop(rel, None))

    def _new_call_dir(self, s: SessionRecord) -> int:
        """The number of a fresh, empty call cgroup: the spare made ahead if
        there is one (its accounting files open in _stat_fds), else made now
        (under the spare's number if it vanished, so that calls stay
        numbered in order)."""
        spares = self.spares.get(s.name)
        if spares:
            n = spares.pop(0)
            if self.cgfs.exists(f"{s.rel}/c-{n}"):
                return n
            self._forget_fds(f"{s.rel}/c-{n}")
        else:
            n = s.next_call
            s.next_call += 1
        self.cgfs.create(f"{s.rel}/c-{n}")
        self._call_oom_group(f"{s.rel}/c-{n}")
        return n

    # -- the OOM killer's preference: a tool call, never the agent ----------
    def _call_oom_group(self, rel: str) -> None:
        """memory.oom.group = 1 on a call cgroup: a kernel OOM kill takes the
        whole call (never leaves half a build running)."""
        if not self.cfg.call_oom_group:
            return
        try:
            self.cgfs._write(rel, "memory.oom.group", "1")
        except OSError:
            pass  # no memory controller here: nothing to group

    def oom_prefer(self, pid: int, role: str, session: Any = None) -> None:
        """oom_score_adj of a placed process: daemon.agent_oom_score_adj for an
        agent (role "agent"); for a tool call, call_oom_score_adj raised by its
        session's distance from the highest priority. Only on a real cgroup2
        tree (fake trees in tests hold no such processes)."""
        if self.mount is None:
            return
        set_oom_score_adj(pid, self.cfg.agent_oom_score_adj if role == "agent" else self.call_oom_adj(session))

    def call_oom_adj(self, session: Any) -> int:
        return self.cfg.call_oom_score_adj_for(session.intent.priority if session is not None else None)

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
        event = {"time": time.time(), **event}
        try:
            if self._log_f is None:
                self._log_f = os.fdopen(open_private(self.cfg.event_log_file, os.O_WRONLY | os.O_APPEND),
                                        "a", buffering=1)
            self._log_f.write(json.dumps(event, separators=(",", ":")) + "\n")
        except OSError as exc:
            log.error("cannot append to event log %s: %s", self.cfg.event_log_file, exc)
        for peer, q in list(self.subscribers):
            if self._may_see(peer, event):
                q.put_nowait(event)

    @staticmethod
    def _may_see(peer: Peer, event: dict[str, Any]) -> bool:
        return peer.root or event.get("uid") == peer.uid

    # -- lookups ---------------------------------------------------------------
    def find_session(self, name: str) -> SessionRecord | None:
        return self.sessions.get(name)

    def get_session(self, name: Any, peer: Peer) -> SessionRecord:
        if not isinstance(name, str):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"session: {name!r} is not a session name")
        s = self.sessions.get(name)
        if s is None:
            raise p.ProtocolError(p.E_NOT_FOUND, f"session: {name!r} does not exist")
        if not peer.root and s.uid != peer.uid:
            raise p.ProtocolError(p.E_FORBIDDEN, f"session: {name!r} belongs to another user")
        return s

    # -- restore ---------------------------------------------------------------
    def restore(self) -> dict[str, int]:
        """Rebuild from the state file and the cgroup tree after a restart."""
        ends: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        _root, saved = load_state(self.cfg.state_file, ends, kept)
        self._restore_results(kept, ends)
        counts = {"sessions": 0, "calls": 0, "adopted": 0, "lost": 0, "removed": 0}
        on_disk = [d[2:] for d in self.cgfs.children() if d.startswith("s-")]
        now_ns = time.monotonic_ns()
        for name in on_disk:
            s = saved.get(name)
            if s is None:
                log.warning("adopting session cgroup s-%s found without state (owner: root)", name)
                s = SessionRecord(name=name, uid=0, intent=Intent(), limits=Limits(),
                                  created_time=time.time())
                counts["adopted"] += 1
            dirs = {}
            for d in self.cgfs.children(s.rel):
                m = CALL_DIR_RE.match(d)
                if m:
                    dirs[int(m.group(1))] = d
            for n in list(s.calls):
                if n not in dirs:
                    lost = s.calls.pop(n)
                    counts["lost"] += 1
                    self.emit({"type": "call.lost", "uid": lost.uid, "session": name, "call": n,
                               "name": lost.name, "reason": "cgroup vanished while the daemon was down"})
            for n in sorted(dirs):
                if n not in s.calls and not self.cgfs.populated(f"{s.rel}/c-{n}"):
                    # empty and unrecorded: a spare made ahead, an ended call whose
                    # rmdir had not run yet, or a start that never replied; not a call
                    if self.cgfs.remove(f"{s.rel}/c-{n}"):
                        del dirs[n]
                        counts["removed"] += 1
                    continue
                if n not in s.calls:
                    # no record (state written before the call started): rebuild what the
                    # tree knows, the start from the directory's creation, the limits from its files
                    rel = f"{s.rel}/c-{n}"
                    born = self.cgfs.created_time(rel) or time.time()
                    age_ns = max(0, int((time.time() - born) * 1e9))
                    s.calls[n] = CallRecord(session=name, n=n, name="(adopted)", uid=s.uid, pid=0,
                                            intent=Intent(), limits=Limits.from_dict(self.cgfs.read_limits(rel)),
                                            start_ns=now_ns - age_ns, start_time=born)
                    counts["adopted"] += 1
                s.calls[n].conn = None  # its client's connection died with the old daemon
                s.calls[n].reconnect_until_ns = now_ns + int(RESTORED_CALL_GRACE_S * 1e9)
                counts["calls"] += 1
            s.next_call = max([s.next_call] + [n + 1 for n in dirs])
            self.sessions[name] = s
            counts["sessions"] += 1
        for name in saved:
            if name not in self.sessions:
                log.warning("session %s in the state file has no cgroup any more; dropped", name)
        self.save()
        log.info("restored %(sessions)d sessions, %(calls)d running calls "
                 "(%(adopted)d adopted, %(lost)d lost), %(removed)d empty call cgroups removed", counts)
        return counts

    def _restore_results(self, kept: list[dict[str, Any]], ends: list[dict[str, Any]]) -> None:
        """call.end results for clients that send call.end again, and the
        call.end event of the journal's last end line if the crash came
        before it was written (see daemon/restart.py)."""
        for r in kept + [e["result"] for e in ends]:
            if isinstance(r.get("session"), str) and isinstance(r.get("call"), int):
                self.finished[(r["session"], r["call"])] = r
        if ends and not end_logged(self.cfg.event_log_file, ends[-1]):
            log.warning("call %s/%s ended just before the restart: writing its call.end event",
                        ends[-1]["session"], ends[-1]["n"])
            self.emit({"type": "call.end", **ends[-1]["result"]})

    def _log_bytes(self) -> int | None:
        """The event log's size: where the next event goes."""
        try:
            if self._log_f is None:
                self._log_f = open(self.cfg.event_log_file, "a", buffering=1)
            return os.fstat(self._log_f.fileno()).st_size
        except OSError:
            return None

    # -- dispatch ----------------------------------------------------------------
    async def handle(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        rid, op = p.check_request(msg)
        fn = getattr(self, "op_" + op.replace(".", "_"))
        try:
            if op == "call.start" and self.hooks.admits:   # may wait for GPU memory (daemon/gpu.py)
                await self.hooks.admit_call(self.get_session(msg.get("session"), peer),
                                            Intent.parse(msg.get("intent")).over(self.config.call_defaults), msg)
            result = fn(msg, peer)
            if asyncio.iscoroutine(result):
                result = await result
        except IntentError as exc:
            raise p.ProtocolError(p.E_INVALID_INTENT, str(exc)) from None
        except BudgetError as exc:
            raise p.ProtocolError(p.E_OVER_GRANT, str(exc)) from None
        except CgroupGone as exc:
            raise p.ProtocolError(p.E_NOT_FOUND, f"cgroup {exc} is gone") from None
        return p.ok_reply(rid, **result)

    # -- ops ---------------------------------------------------------------------
    def op_status(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        mine = [s for s in self.sessions.values() if peer.root or s.uid == peer.uid]
        return {"daemon": {"pid": self.own_pid, "version": 1, "cgroup_root": str(self.cgfs.root),
                           "uptime_s": round(time.time() - self.started_time, 3),
                           "controllers": sorted(self.enabled_controllers),
                           "hierarchy": self.hierarchy,
                           "straggler_policy": self.cfg.straggler_policy},
                "sessions": len(mine),
                "running_calls": sum(len(s.calls) for s in mine),
                "hooks": self.hooks.status()}

    def _session_view(self, s: SessionRecord) -> dict[str, Any]:
        return {"name": s.name, "uid": s.uid, "intent": s.intent.to_dict(), "limits": s.limits.to_dict(),
                "cgroup": str(self.cgfs.path(s.rel)), "created_time": s.created_time,
                "running_calls": len(s.calls), "calls_done": s.calls_done,
                "agent_pids": self.cgfs.procs(f"{s.rel}/agent")}

    def op_session_create(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        name = msg.get("name")
        if not isinstance(name, str) or not SESSION_NAME_RE.match(name):
            raise p.ProtocolError(p.E_BAD_REQUEST,
                                  f"name: {name!r} is not a session name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})")
        owner = msg.get("uid", peer.uid)
        if isinstance(owner, bool) or not isinstance(owner, int) or owner < 0:
            raise p.ProtocolError(p.E_BAD_REQUEST, f"uid: {owner!r} is not a uid")
        if owner != peer.uid and not peer.root:
            raise p.ProtocolError(p.E_FORBIDDEN, f"uid: only root may create a session for uid {owner}")
        if name in self.sessions:
            if msg.get("exist_ok") and (peer.root or self.sessions[name].uid == peer.uid):
                return {"session": self._session_view(self.sessions[name]), "existed": True}
            raise p.ProtocolError(p.E_EXISTS, f"name: session {name!r} exists")
        grant = self.config.grant_for(owner)
        if grant.max_sessions is not None and \
                sum(1 for s in self.sessions.values() if s.uid == owner) >= grant.max_sessions:
            raise p.ProtocolError(p.E_OVER_GRANT, f"max_sessions: uid {owner} already has "
                                                  f"{grant.max_sessions} sessions")
        intent = with_grant_priority(Intent.parse(msg.get("intent")).over(self.config.session_defaults), grant)
        limits = session_limits(intent, grant, owner)
        s = SessionRecord(name=name, uid=owner, intent=intent, limits=limits, created_time=time.time())
        self.cgfs.create(s.rel)
        try:
            self.cgfs.enable_controllers(s.rel, self.enabled_controllers)
            res = self.cgfs.apply_limits(s.rel, limits.files(), f"session {name} intent {intent.describe()}")
            self.cgfs.create(f"{s.rel}/agent")
        except OSError as exc:
            self.cgfs.remove_tree(s.rel)
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {s.rel}: {exc}") from None
        self.sessions[name] = s
        self.save()
        self.hooks.session_create(s, self.cgfs.path(s.rel))
        self.later(self.refill_spares, name)
        self.emit({"type": "session.create", "uid": owner, "session": name, "by_uid": peer.uid,
                   "intent": intent.to_dict(), "limits": limits.to_dict()})
        return {"session": self._session_view(s), "skipped_files": res["skipped"]}

    def op_session_list(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"sessions": [self._session_view(s) for s in self.sessions.values()
                             if peer.root or s.uid == peer.uid]}

    def op_session_show(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        s = self.get_session(msg.get("name"), peer)
        view = self._session_view(s)
        view["calls"] = [{"call": c.n, "name": c.name, "pid": c.pid, "limits": c.limits.to_dict(),
                          "running_s": round((time.monotonic_ns() - c.start_ns) / 1e9, 3),
                          "stats": self.cgfs.read_stats(c.rel)} for c in s.calls.values()]
        view["recent"] = [r for (sn, _n), r in self.finished.items() if sn == s.name][-20:]
        view.update(self.hooks.session_view(s))
        return {"session": view}

    def op_session_attach(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        s = self.get_session(msg.get("name"), peer)
        pid = msg.get("pid")
        check_pid(pid, peer, child_only=False, own_pid=self.own_pid)
        origin = pid_cgroup(pid) or "/"
        # protected before it enters the budget: at a full budget the OOM killer
        # must never find it there at its old value
        old_adj = read_oom_score_adj(pid)
        self.oom_prefer(pid, "agent")
        try:
            self.cgfs.place(f"{s.rel}/agent", pid)
        except ProcessLookupError:
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited") from None
        except OSError:
            if old_adj is not None and self.mount is not None:
                set_oom_score_adj(pid, old_adj)  # not attached: not protected either
            raise
        s.attached[pid] = origin
        self.save()
        self.emit({"type": "session.attach", "uid": s.uid, "session": s.name, "pid": pid})
        return {"cgroup": str(self.cgfs.path(f"{s.rel}/agent"))}

    async def op_session_end(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        s = self.get_session(msg.get("name"), peer)
        if s.calls and not msg.get("force"):
            raise p.ProtocolError(p.E_BUSY, f"session {s.name!r} has {len(s.calls)} running tool calls; "
                                            "end them first or pass force=true to kill them")
        ended = []
        for c in list(s.calls.values()):
            ended.append(await self.finalise(s, c, exit_status=None, reason="session ended",
                                             force_kill=True))
        # the agent's own processes go back where they came from
        moved = 0
        if self.mount:
            for pid in self.cgfs.procs(f"{s.rel}/agent"):
                origin = s.attached.get(pid, "/")
                target = Path(self.mount + origin) if origin != "/" else Path(self.mount)
                if not target.is_dir():
                    target = Path(self.mount)
                try:
                    (target / "cgroup.procs").write_text(str(pid))
                    moved += 1
                except OSError as exc:
                    log.warning("cannot move agent pid %d back to %s: %s", pid, target, exc)
        self.hooks.session_end(s, self.cgfs.path(s.rel))
        self._drop_spares(s.name)
        removed = self.cgfs.remove_tree(s.rel)
        del self.sessions[s.name]
        self.save()
        self.emit({"type": "session.end", "uid": s.uid, "session": s.name, "by_uid": peer.uid,
                   "calls_done": s.calls_done, "removed": removed})
        return {"session": s.name, "removed": removed, "calls_ended": len(ended), "agent_pids_moved": moved}

    def op_call_start(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """placement "pid" (default): place the caller's waiting child `pid`.
        placement "clone_into": no pid yet; the reply carries an O_RDONLY fd of
        the call cgroup (SCM_RIGHTS, reply field "cgroup_fd": true); the client
        clone3()s its child into it and names the pid with call.started."""
        s = self.get_session(msg.get("session"), peer)
        placement = msg.get("placement", "pid")
        if placement not in PLACEMENTS:
            raise p.ProtocolError(p.E_BAD_REQUEST, f"placement: {placement!r} is not one of {list(PLACEMENTS)}")
        pid = msg.get("pid") if placement == "pid" else 0
        if placement == "pid":
            check_pid(pid, peer, child_only=True, own_pid=self.own_pid)
        name = msg.get("name") or ""
        argv = msg.get("argv") or []
        if not isinstance(name, str) or not isinstance(argv, list):
            raise p.ProtocolError(p.E_BAD_REQUEST, "name/argv: not a string / list of strings")
        intent = Intent.parse(msg.get("intent")).over(self.config.call_defaults)
        limits, adjustments = call_limits(intent, s.limits)
        token = msg.get("token")
        token = token if isinstance(token, str) else ""
        again = next((c for c in s.calls.values() if token and c.token == token), None)
        if again is not None:   # a resend after a restart: the same call, never a second
            return self._call_start_again(s, again, placement, pid, peer, adjustments)
        n = self._new_call_dir(s)
        c = CallRecord(session=s.name, n=n, name=name, uid=s.uid, pid=pid, intent=intent, limits=limits,
                       start_ns=time.monotonic_ns(), start_time=time.time(),
                       argv=[str(a) for a in argv][:64], conn=peer.conn, token=token)
        fd = None
        try:
            res = self.cgfs.apply_limits(c.rel, limits.files(),
                                         f"call {name or n} intent {intent.describe() or '(defaults)'}")
            # journaled before the pid is placed and the reply: restore must tell a
            # started call from an empty spare even if the tool ran and exited while
            # the daemon was down, and a resent call.start finds its call, not a stray
            s.calls[n] = c
            self.record({"op": "start", "call": c.to_dict()})
            if placement == "pid":
                self.cgfs.place(c.rel, pid)
                self.oom_prefer(pid, "call", s)
            else:
                fd = self.cgfs.open_dir(c.rel)
        except ProcessLookupError:
            self._abort_start(s, c)
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
        except OSError as exc:
            self._abort_start(s, c)
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {c.rel}: {exc}") from None
        self.later(self.refill_spares, s.name)
        reply = {"call": n, "cgroup": str(self.cgfs.path(c.rel)), "limits": limits.to_dict(),
                 "adjustments": [a.to_dict() for a in adjustments], "skipped_files": res["skipped"]}
        if fd is not None:
            # hooks and the event wait for call.started, which names the pid
            # the child sets its own oom_score_adj before exec (raising needs no privilege)
            reply.update(placement="clone_into", cgroup_fd=True, _fds=[fd],
                         oom_score_adj=self.call_oom_adj(s) if self.mount is not None else None)
            return reply
        self.hooks.call_start(s, c, self.cgfs.path(c.rel))
        self.emit({"type": "call.start", "uid": s.uid, "session": s.name, "call": n, "name": name,
                   "pid": pid, "intent": intent.to_dict(), "limits": limits.to_dict()})
        return reply

    def _abort_start(self, s: SessionRecord, c: CallRecord) -> None:
        if s.calls.pop(c.n, None) is not None:
            self.record({"op": "drop", "session": s.name, "n": c.n})
        self._forget_fds(c.rel)
        self.cgfs.remove(c.rel)

    def _call_start_again(self, s: SessionRecord, c: CallRecord, placement: str, pid: int, peer: Peer,
                          adjustments: list[Any]) -> dict[str, Any]:
        """The reply to a call.start whose first reply was lost in a restart:
        its pid placed if it is not yet (the crash came before), or a fresh fd
        of its cgroup for clone_into."""
        fd = None
        try:
            if placement == "pid":
                if not self._in_cgroup(pid, c.rel):
                    self.cgfs.place(c.rel, pid)
                    self.oom_prefer(pid, "call", s)
                c.pid = pid
            else:
                fd = self.cgfs.open_dir(c.rel)
        except ProcessLookupError:
            raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
        except OSError as exc:
            raise p.ProtocolError(p.E_CGROUP, f"cannot set up {c.rel}: {exc}") from None
        c.conn, c.reconnect_until_ns = peer.conn, 0
        reply = {"call": c.n, "cgroup": str(self.cgfs.path(c.rel)), "limits": c.limits.to_dict(),
                 "adjustments": [a.to_dict() for a in adjustments], "skipped_files": [], "resent": True}
        if fd is not None:
            reply.update(placement="clone_into", cgroup_fd=True, _fds=[fd],
                         oom_score_adj=self.call_oom_adj(s) if self.mount is not None else None)
        return reply

    def op_call_started(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The pid of a clone_into call's child. It must be the caller's child;
        if it is not inside the call cgroup yet (clone3 was refused and the
        client fell back to a waiting child), it is placed now, before the
        client lets it exec."""
        s = self.get_session(msg.get("session"), peer)
        n = msg.get("call")
        if isinstance(n, bool) or not isinstance(n, int):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"call: {n!r} is not a call number")
        c = s.calls.get(n)
        if c is None:
            raise p.ProtocolError(p.E_NOT_FOUND, f"call: {n} is not running in session {s.name!r}")
        pid = msg.get("pid")
        if c.pid and c.pid == pid:     # a resend after a restart
            return {"call": n, "pid": pid, "resent": True}
        if c.pid:
            raise p.ProtocolError(p.E_BAD_REQUEST, f"call: {n} already has pid {c.pid}")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or pid == self.own_pid:
            raise p.ProtocolError(p.E_BAD_REQUEST, f"pid: {pid!r} is not a process id")
        placed = "clone_into"
        # inside already: born there through the fd only this caller received
        if not self._in_cgroup(pid, c.rel):
            check_pid(pid, peer, child_only=True, own_pid=self.own_pid)
            try:
                self.cgfs.place(c.rel, pid)
            except ProcessLookupError:
                raise p.ProtocolError(p.E_BAD_PID, f"pid: {pid} exited before it was placed") from None
            except OSError as exc:
                raise p.ProtocolError(p.E_CGROUP, f"cannot place pid {pid} in {c.rel}: {exc}") from None
            placed = "pid"
        self.oom_prefer(pid, "call", s)  # for clients that do not set it in the child
        c.pid = pid
        # the child runs already: the hooks see the call after this reply
        self._starting[(s.name, n)] = placed
        self.later(self._call_started, s.name, n)
        return {"call": n, "pid": pid, "placement": placed}

    def _in_cgroup(self, pid: int, rel: str) -> bool:
        """Whether pid (alive or a zombie: /proc/<pid>/cgroup still names it) is in rel.
        First through the call's cgroup.procs opened ahead (one pread, lists the
        living); /proc/<pid>/cgroup (which waits for the kernel's cgroup mutex,
        busy right after a clone into a cgroup or an rmdir) for the rest."""
        fds = self._stat_fds.get(rel)
        if fds is not None and pid in self.cgfs.procs(rel, fds):
            return True
        cg = pid_cgroup(pid)
        if cg is None:
            return False
        if self.mount is not None:
            return os.path.normpath(self.mount.rstrip("/") + cg) == self._f_path(rel)
        return pid in self.cgfs.procs(rel)

    def _f_path(self, rel: str) -> str:
        return os.path.normpath(str(self.cgfs.path(rel)))

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

    async def op_call_end(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        name = msg.get("session")
        n = msg.get("call")
        if not isinstance(name, str):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"session: {p.show(name)} is not a session name")
        if isinstance(n, bool) or not isinstance(n, int):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"call: {p.show(n)} is not a call number")
        # the name is a string before it is a key: a list or dict is unhashable
        done = self.finished.get((name, n))
        s = self.sessions.get(name)
        if done is not None and (s is None or n not in s.calls):
            if not peer.root and done.get("uid") != peer.uid:
                raise p.ProtocolError(p.E_FORBIDDEN, f"session: {name!r} belongs to another user")
            return done
        s = self.get_session(name, peer)
        c = s.calls.get(n)
        if c is None:
            raise p.ProtocolError(p.E_NOT_FOUND, f"call: {n} is not running in session {name!r}")
        exit_status = msg.get("exit_status")
        return await self.finalise(s, c, exit_status=exit_status if isinstance(exit_status, int) else None,
                                   reason="ended by client")

    async def op_events(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        raise AssertionError("events is streamed by the server")  # pragma: no cover

    async def stream_events(self, msg: dict[str, Any], peer: Peer) -> AsyncIterator[dict[str, Any]]:
        """Past events from the log (the caller's only, unless root), then new ones if follow."""
        session = msg.get("session")
        q: asyncio.Queue | None = None
        if msg.get("follow"):
            q = asyncio.Queue()
            self.subscribers.append((peer, q))
        try:
            if msg.get("history", True):
                try:
                    with open(self.cfg.event_log_file) as f:
                        for line in f:
                            try:
                                ev = json.loads(line)
                            except ValueError:
                                continue
                            if self._may_see(peer, ev) and (session is None or ev.get("session") == session):
                                yield ev
                except FileNotFoundError:
                    pass
            if q is not None:
                while True:
                    ev = await q.get()
                    if session is None or ev.get("session") == session:
                        yield ev
        finally:
            if q is not None:
                self.subscribers = [(pp, qq) for pp, qq in self.subscribers if qq is not q]

    # -- the end of a call -------------------------------------------------------------
    async def finalise(self, s: SessionRecord, c: CallRecord, *, exit_status: int | None,
                       reason: str, force_kill: bool = False) -> dict[str, Any]:
        key = (s.name, c.n)
        while key in self._finalising:          # a concurrent finalise of the same call
            await asyncio.sleep(0.01)
            if key in self.finished:
                return self.finished[key]
        self._finalising.add(key)
        try:
            return await self._finalise(s, c, exit_status=exit_status, reason=reason, force_kill=force_kill)
        finally:
            self._finalising.discard(key)

    async def _finalise(self, s: SessionRecord, c: CallRecord, *, exit_status: int | None,
                        reason: str, force_kill: bool) -> dict[str, Any]:
        if (s.name, c.n) in self._starting:
            self._call_started(s.name, c.n)
        rel = c.rel
        fds = self._stat_fds.get(rel)
        stragglers = 0
        action = None
        policy = "kill" if force_kill else self.cfg.straggler_policy
        if self.cgfs.populated(rel, fds):
            if policy == "kill" and not force_kill:
                deadline = time.monotonic() + self.cfg.straggler_grace_ms / 1000
                while self.cgfs.populated(rel, fds) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            left = self.cgfs.procs(rel)
            if left:
                stragglers = len(left)
                if policy == "kill":
                    self.cgfs.kill(rel, f"call {c.n} ended ({reason}): {stragglers} stragglers")
                    action = "killed"
                    deadline = time.monotonic() + 5.0
                    while self.cgfs.populated(rel, fds) and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                else:
                    action = "kept"
        raw = self.cgfs.read_stats(rel, fds)
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
        # event, so that restore can tell whether the event was written (restart.py)
        self.record({"op": "end", "session": s.name, "n": c.n, "done": s.calls_done, "result": result,
                     "log_bytes": self._log_bytes()})
        self.finished[(s.name, c.n)] = result
        while len(self.finished) > self.cfg.finished_keep:
            self.finished.pop(next(iter(self.finished)))
        if action == "kept":
            self._forget_fds(rel)
            self.lingering.add(rel)
        else:
            self.later(self.remove_ended, rel)
        self.emit({"type": "call.end", **result})
        return result

    # -- background watch --------------------------------------------------------------
    def connection_closed(self, conn: int) -> None:
        for s in self.sessions.values():
            for c in s.calls.values():
                if c.conn == conn:
                    c.conn = None

    async def watch(self) -> None:
        """Finalise calls whose client is gone once their processes are gone,
        and remove kept cgroups once their stragglers exit."""
        interval = max(0.05, self.cfg.watch_interval_ms / 1000)
        while True:
            await asyncio.sleep(interval)
            try:
                now_ns = time.monotonic_ns()
                for s in list(self.sessions.values()):
                    for c in list(s.calls.values()):
                        if c.conn is None and c.reconnect_until_ns <= now_ns and \
                                not self.cgfs.populated(c.rel, self._stat_fds.get(c.rel)):
                            await self.finalise(s, c, exit_status=None,
                                                reason="processes exited; client gone")
                for rel in list(self.lingering):
                    if not self.cgfs.populated(rel) and self.cgfs.remove(rel):
                        self.lingering.discard(rel)
            except Exception:
                log.exception("watch pass failed")

    async def teardown(self) -> None:
        """Kill every tool call and remove the whole tree (agentcgd --teardown)."""
        for s in list(self.sessions.values()):
            for c in list(s.calls.values()):
                await self.finalise(s, c, exit_status=None, reason="daemon teardown", force_kill=True)
            if self.cgfs.populated(s.rel):
                self.cgfs.kill(s.rel, "daemon teardown")
                self.cgfs.wait_unpopulated(s.rel, 5.0)
            self._drop_spares(s.name)
            self.cgfs.remove_tree(s.rel)
            del self.sessions[s.name]
        self.save()
