"""The protocol's op handlers: check the request's fields and the peer's
right to it, call the daemon's service API (daemon/service.py), shape the
reply. No cgroup, journal or event work happens here.

`Peer` is the other end of a connection (pid, uid, gid from SO_PEERCRED);
`check_pid` is the rule for which processes a peer may place.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from agentcg import protocol as p
from agentcg.adapters.cgroupfs import CgroupGone
from agentcg.adapters.procfs import proc_status
from agentcg.core.intents import BudgetError, Intent, IntentError
from agentcg.core.model import SESSION_NAME_RE

from .state import SessionRecord

if TYPE_CHECKING:
    from .service import Started

PLACEMENTS = ("pid", "clone_into")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    conn: int = 0

    @property
    def root(self) -> bool:
        return self.uid == 0

    @property
    def sees(self) -> int | None:
        """Whose events this peer may read: None (every uid's) for root, else its own uid."""
        return None if self.root else self.uid


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


def _call_number(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise p.ProtocolError(p.E_BAD_REQUEST, f"call: {p.show(n)} is not a call number")
    return n


class Handlers:
    """op_<name>(msg, peer) for each protocol op, dispatched by handle().
    A base of `Daemon`: `self` is the daemon and its service API."""

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

    def get_session(self, name: Any, peer: Peer) -> SessionRecord:
        """The session named in a request, if the peer may act on it."""
        if not isinstance(name, str):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"session: {name!r} is not a session name")
        s = self.sessions.get(name)
        if s is None:
            raise p.ProtocolError(p.E_NOT_FOUND, f"session: {p.show(name)} does not exist")
        if not peer.root and s.uid != peer.uid:
            raise p.ProtocolError(p.E_FORBIDDEN, f"session: {name!r} belongs to another user")
        return s

    # -- daemon and sessions ----------------------------------------------------------
    def op_status(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self.status(peer.sees)

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
                return {"session": self.session_view(self.sessions[name]), "existed": True}
            raise p.ProtocolError(p.E_EXISTS, f"name: session {name!r} exists")
        s, skipped = self.create_session(name, uid=owner, intent=Intent.parse(msg.get("intent")),
                                         by_uid=peer.uid)
        return {"session": self.session_view(s), "skipped_files": skipped}

    def op_session_list(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"sessions": [self.session_view(s) for s in self.sessions.values()
                             if peer.root or s.uid == peer.uid]}

    def op_session_show(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        s = self.get_session(msg.get("name"), peer)
        view = self.session_view(s)
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
        return {"cgroup": str(self.attach_agent(s, pid))}

    async def op_session_end(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        s = self.get_session(msg.get("name"), peer)
        if s.calls and not msg.get("force"):
            raise p.ProtocolError(p.E_BUSY, f"session {s.name!r} has {len(s.calls)} running tool calls; "
                                            "end them first or pass force=true to kill them")
        return await self.end_session(s, by_uid=peer.uid)

    # -- tool calls ----------------------------------------------------------------------
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
        token = msg.get("token")
        started = self.start_call(s, pid=pid, name=name, argv=[str(a) for a in argv],
                                  intent=Intent.parse(msg.get("intent")), placement=placement,
                                  conn=peer.conn, token=token if isinstance(token, str) else "")
        return self._started_reply(s, started)

    def _started_reply(self, s: SessionRecord, started: "Started") -> dict[str, Any]:
        c = started.call
        reply = {"call": c.n, "cgroup": str(self.cgfs.path(c.rel)), "limits": c.limits.to_dict(),
                 "adjustments": [a.to_dict() for a in started.adjustments],
                 "skipped_files": started.skipped_files}
        if started.resent:
            reply["resent"] = True
        if started.fd is not None:
            # the child sets its own oom_score_adj before exec (raising needs no privilege)
            reply.update(placement="clone_into", cgroup_fd=True, _fds=[started.fd],
                         oom_score_adj=self.calls.call_oom_adj(s) if self.mount is not None else None)
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
        # inside already: born there through the fd only this caller received
        inside = self.calls.in_cgroup(pid, c.rel)
        if not inside:
            check_pid(pid, peer, child_only=True, own_pid=self.own_pid)
        placed = self.call_started(s, c, pid, inside=inside)
        return {"call": n, "pid": pid, "placement": placed}

    async def op_call_end(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        name = msg.get("session")
        if not isinstance(name, str):
            raise p.ProtocolError(p.E_BAD_REQUEST, f"session: {p.show(name)} is not a session name")
        n = _call_number(msg.get("call"))
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
        return await self.end_call(s, c, exit_status=exit_status if isinstance(exit_status, int) else None,
                                   reason="ended by client")

    # -- events ------------------------------------------------------------------------------
    async def op_events(self, msg: dict[str, Any], peer: Peer) -> dict[str, Any]:
        raise AssertionError("events is streamed by the server")  # pragma: no cover

    def stream_events(self, msg: dict[str, Any], peer: Peer) -> AsyncIterator[dict[str, Any]]:
        """Past events from the log (the caller's only, unless root), then new ones if follow."""
        return self.events.stream(peer.sees, session=msg.get("session"), follow=bool(msg.get("follow")),
                                  history=bool(msg.get("history", True)))
