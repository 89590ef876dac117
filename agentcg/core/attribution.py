"""Who is who: processes attributed to sessions and tool calls, from kernel events.

Pure: fed with ProcEvents (decoded from the tracker's ring buffer) and with
what the daemon knows (which cgroup id is which session / call, which pid is
a registered agent), it keeps the process tree of every call and returns
decisions for the daemon to carry out:

- automatic mode (:class:`NewCall`, :class:`MoveToCall`, :class:`CallFinished`):
  a session registered by the agent's pid gets one tool call per process the
  agent starts. The decision is taken at that child's first exec (the command
  is known then, and config rules pick the intent); the child and everything
  it forked before the move go to a fresh call cgroup; a fork that races the
  move is moved after it.
- escapes (:class:`Escape`): processes still alive when their call ended:
  background children, double forks and daemons (re-parented because their
  parent exited).
- OOM victims (:class:`OomVictim`).

Nothing here reads files or clocks; timestamps come in the events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from agentcg.core.rules_match import CommandRule, match_command, program_name


@dataclass(frozen=True)
class ProcEvent:
    """One kernel event about a process (see bpf/agentcg.h struct agentcg_event)."""

    kind: str                  # "fork" | "exec" | "exit" | "oom"
    pid: int
    tgid: int
    ppid: int                  # parent's tgid at the time of the event
    cgroup_id: int             # cgroup v2 id of the subject
    ts_ns: int                 # CLOCK_MONOTONIC
    start_ns: int = 0
    comm: str = ""
    filename: str = ""         # exec only
    argv: tuple[str, ...] = ()  # exec only (may be truncated)
    exit_code: int = 0         # exit only: wait status
    args_truncated: bool = False
    stopped: bool = False      # exec only: stopped in the kernel until the daemon continues it


@dataclass(frozen=True)
class Place:
    session: str
    call: int | None           # None: the session's agent cgroup (or the session itself)


# -- decisions ------------------------------------------------------------
@dataclass(frozen=True)
class NewCall:
    """Automatic mode: put `pids` (root first) into a fresh tool call of `session`."""

    session: str
    root_pid: int
    pids: tuple[int, ...]
    program: str
    cmdline: str
    intent: Mapping[str, Any]
    reason: str
    exec_ts_ns: int            # when the root exec'd: placement latency starts here


@dataclass(frozen=True)
class MoveToCall:
    """A process forked by a call's process before that was moved: follow it."""

    session: str
    call: int
    pid: int
    reason: str
    fork_ts_ns: int


@dataclass(frozen=True)
class CallFinished:
    """Automatic mode: the call's root process exited."""

    session: str
    call: int
    root_pid: int
    exit_code: int
    reason: str


@dataclass(frozen=True)
class Escape:
    """A process that outlived its tool call."""

    session: str
    call: int
    pid: int
    comm: str
    cmdline: str
    reparented: bool
    action: str                # "kill" | "keep"
    reason: str


@dataclass(frozen=True)
class OomVictim:
    session: str
    call: int | None
    pid: int
    comm: str
    cgroup_id: int
    ts_ns: int


Decision = NewCall | MoveToCall | CallFinished | Escape | OomVictim

ESCAPE_ACTIONS = ("kill", "keep")


@dataclass
class _Proc:
    tgid: int
    ppid: int
    cgroup_id: int
    start_ns: int
    comm: str = ""
    filename: str = ""
    argv: tuple[str, ...] = ()
    place: Place | None = None
    alive: bool = True
    children: set[int] = field(default_factory=set)

    @property
    def cmdline(self) -> str:
        if self.argv:
            return " ".join(self.argv)
        return self.filename or self.comm


@dataclass
class _Agent:
    tgid: int
    cgroup_id: int
    pending: dict[int, set[int]] = field(default_factory=dict)  # direct child -> its descendants so far


class Attribution:
    """Process tree per session and tool call, fed one event at a time."""

    def __init__(self, rules: Sequence[CommandRule] = (), escape_action: str = "keep",
                 default_intent: Mapping[str, Any] | None = None):
        if escape_action not in ESCAPE_ACTIONS:
            raise ValueError(f"escape_action={escape_action!r}: expected one of {ESCAPE_ACTIONS}")
        self.rules = tuple(rules)
        self.escape_action = escape_action
        self.default_intent = dict(default_intent or {})
        self._cgroups: dict[int, Place] = {}
        self._procs: dict[int, _Proc] = {}
        self._agents: dict[str, _Agent] = {}
        self._roots: dict[tuple[str, int], int] = {}   # auto call -> root tgid
        self._placing: dict[int, tuple[str, int]] = {}  # tgid moved (or being moved) -> call

    # -- what the daemon tells us -----------------------------------------
    def add_cgroup(self, cgroup_id: int, session: str, call: int | None = None) -> None:
        self._cgroups[cgroup_id] = Place(session, call)

    def remove_cgroup(self, cgroup_id: int) -> None:
        self._cgroups.pop(cgroup_id, None)

    def place_of_cgroup(self, cgroup_id: int) -> Place | None:
        return self._cgroups.get(cgroup_id)

    def register_agent(self, session: str, tgid: int, agent_cgroup_id: int) -> None:
        """Automatic mode for `session`: children of `tgid` become tool calls."""
        self._agents[session] = _Agent(tgid=tgid, cgroup_id=agent_cgroup_id)
        p = self._procs.get(tgid)
        if p is None:
            self._procs[tgid] = _Proc(tgid=tgid, ppid=0, cgroup_id=agent_cgroup_id, start_ns=0,
                                      place=Place(session, None))
        else:
            p.place = Place(session, None)

    def unregister_agent(self, session: str) -> None:
        self._agents.pop(session, None)

    def agent_of(self, session: str) -> int | None:
        a = self._agents.get(session)
        return a.tgid if a else None

    def call_placed(self, session: str, call: int, pids: Sequence[int], root_pid: int | None = None) -> None:
        """The daemon moved `pids` into call `call` (root first when it is a NewCall)."""
        for pid in pids:
            p = self._procs.get(pid)
            if p is not None:
                p.place = Place(session, call)
            self._placing[pid] = (session, call)
        if root_pid is not None:
            self._roots[(session, call)] = root_pid

    def call_ended(self, session: str, call: int) -> list[Escape]:
        """The call is over: every process of it still alive is an escape."""
        out = []
        self._roots.pop((session, call), None)
        for p in list(self._procs.values()):
            if not p.alive or p.place != Place(session, call):
                continue
            parent = self._procs.get(p.ppid)
            reparented = parent is None or not parent.alive
            if reparented:
                why = (f"pid {p.tgid} ({p.comm}) outlived tool call {call} of session {session}: "
                       f"its parent {p.ppid} exited (double fork, setsid or daemon)")
            else:
                why = (f"pid {p.tgid} ({p.comm}) outlived tool call {call} of session {session}: "
                       f"still running after the call ended")
            out.append(Escape(session=session, call=call, pid=p.tgid, comm=p.comm, cmdline=p.cmdline,
                              reparented=reparented, action=self.escape_action, reason=why))
        for pid in [pid for pid, c in self._placing.items() if c == (session, call)]:
            del self._placing[pid]
        return out

    def session_ended(self, session: str) -> None:
        self._agents.pop(session, None)
        for cg in [cg for cg, pl in self._cgroups.items() if pl.session == session]:
            del self._cgroups[cg]
        for pid in [pid for pid, p in self._procs.items() if p.place and p.place.session == session]:
            del self._procs[pid]

    # -- queries -------------------------------------------------------------
    def place_of_pid(self, pid: int) -> Place | None:
        p = self._procs.get(pid)
        return p.place if p else None

    def alive_pids(self, session: str, call: int | None) -> list[int]:
        want = Place(session, call)
        return sorted(p.tgid for p in self._procs.values() if p.alive and p.place == want)

    def tree(self, session: str, call: int | None) -> list[dict]:
        """The live process tree of a call (or of the agent cgroup): nested dicts."""
        want = Place(session, call)
        members = {pid: p for pid, p in self._procs.items() if p.alive and p.place == want}

        def node(p: _Proc) -> dict:
            kids = sorted(c for c in p.children if c in members)
            return {"pid": p.tgid, "ppid": p.ppid, "comm": p.comm, "cmdline": p.cmdline,
                    "children": [node(members[c]) for c in kids]}

        roots = sorted(pid for pid, p in members.items() if p.ppid not in members)
        return [node(members[r]) for r in roots]

    def __len__(self) -> int:
        return len(self._procs)

    # -- events --------------------------------------------------------------
    def feed(self, ev: ProcEvent) -> list[Decision]:
        if ev.kind == "fork":
            return self._on_fork(ev)
        if ev.kind == "exec":
            return self._on_exec(ev)
        if ev.kind == "exit":
            return self._on_exit(ev)
        if ev.kind == "oom":
            return self._on_oom(ev)
        raise ValueError(f"event kind {ev.kind!r} is not one of fork/exec/exit/oom")

    def _place_for(self, ev: ProcEvent, parent: _Proc | None) -> Place | None:
        pl = self._cgroups.get(ev.cgroup_id)
        if pl is not None:
            return pl
        return parent.place if parent is not None else None

    def _on_fork(self, ev: ProcEvent) -> list[Decision]:
        parent = self._procs.get(ev.ppid)
        place = self._place_for(ev, parent)
        if place is None and parent is None:
            return []  # not ours
        p = _Proc(tgid=ev.tgid, ppid=ev.ppid, cgroup_id=ev.cgroup_id, start_ns=ev.start_ns,
                  comm=ev.comm, place=place)
        if parent is not None:
            p.argv, p.filename = parent.argv, parent.filename
            parent.children.add(ev.tgid)
        self._procs[ev.tgid] = p
        out: list[Decision] = []
        agent = self._agents.get(place.session) if place else None
        if agent is not None:
            if ev.ppid == agent.tgid and ev.cgroup_id == agent.cgroup_id:
                agent.pending[ev.tgid] = set()          # a new tool call, once it execs
            else:
                for root, desc in agent.pending.items():
                    if ev.ppid == root or ev.ppid in desc:
                        desc.add(ev.tgid)               # moves with its root
                        break
        target = self._placing.get(ev.ppid)
        if target is not None and (place is None or place.call != target[1]):
            # the parent was moved, but this child was forked in the old cgroup
            sess, call = target
            p.place = Place(sess, call)
            self._placing[ev.tgid] = target
            out.append(MoveToCall(session=sess, call=call, pid=ev.tgid, fork_ts_ns=ev.ts_ns,
                                  reason=f"pid {ev.tgid} forked by {ev.ppid} before {ev.ppid} moved to call {call}"))
        return out

    def _on_exec(self, ev: ProcEvent) -> list[Decision]:
        p = self._procs.get(ev.tgid)
        if p is None:
            place = self._cgroups.get(ev.cgroup_id)
            if place is None:
                return []
            p = _Proc(tgid=ev.tgid, ppid=ev.ppid, cgroup_id=ev.cgroup_id, start_ns=ev.start_ns, place=place)
            self._procs[ev.tgid] = p
        p.comm, p.filename, p.argv, p.cgroup_id = ev.comm, ev.filename, ev.argv, ev.cgroup_id
        if p.place is None or ev.cgroup_id in self._cgroups:
            p.place = self._cgroups.get(ev.cgroup_id, p.place)
        if p.place is None:
            return []
        agent = self._agents.get(p.place.session)
        if agent is None or ev.tgid not in agent.pending or ev.cgroup_id != agent.cgroup_id:
            return []
        desc = agent.pending.pop(ev.tgid)
        alive_desc = tuple(sorted(d for d in desc if d in self._procs and self._procs[d].alive))
        m = match_command(self.rules, ev.filename, ev.argv)
        program = program_name(ev.filename, ev.argv)
        if m is not None:
            intent, reason, cmdline = m.intent, m.reason, m.cmdline
        else:
            cmdline = " ".join(ev.argv) if ev.argv else program
            intent = self.default_intent
            reason = f"agent {agent.tgid} started {cmdline!r} (no auto rule matched: session default)"
        return [NewCall(session=p.place.session, root_pid=ev.tgid, pids=(ev.tgid, *alive_desc),
                        program=program, cmdline=cmdline, intent=dict(intent), reason=reason,
                        exec_ts_ns=ev.ts_ns)]

    def _on_exit(self, ev: ProcEvent) -> list[Decision]:
        p = self._procs.get(ev.tgid)
        if p is None:
            return []
        p.alive = False
        out: list[Decision] = []
        for agent in self._agents.values():
            agent.pending.pop(ev.tgid, None)
            for desc in agent.pending.values():
                desc.discard(ev.tgid)
        place = p.place
        if place is not None and place.call is not None and self._roots.get((place.session, place.call)) == ev.tgid:
            out.append(CallFinished(session=place.session, call=place.call, root_pid=ev.tgid,
                                    exit_code=ev.exit_code,
                                    reason=f"root pid {ev.tgid} ({p.comm}) exited, status {ev.exit_code}"))
        # keep the dead entry while it still has live children (their parent link), else drop it
        parent = self._procs.get(p.ppid)
        if parent is not None:
            parent.children.discard(ev.tgid)
            if not parent.alive and not parent.children:
                self._procs.pop(parent.tgid, None)
        if not p.children:
            self._procs.pop(ev.tgid, None)
        self._placing.pop(ev.tgid, None)
        return out

    def _on_oom(self, ev: ProcEvent) -> list[Decision]:
        place = self._cgroups.get(ev.cgroup_id) or self.place_of_pid(ev.tgid)
        if place is None:
            return []
        return [OomVictim(session=place.session, call=place.call, pid=ev.tgid, comm=ev.comm,
                          cgroup_id=ev.cgroup_id, ts_ns=ev.ts_ns)]
