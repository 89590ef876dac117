"""The cgroups of tool calls: the spare pool, accounting descriptors kept
open, stragglers at a call's end, removal, and the OOM killer's preference.

`CallPool` owns the c-<n> directories of every session: it makes the next
one ahead (cgroup2 cannot rename a directory, so a spare is made under the
number of the next call), hands it out at call.start, reaps what is left in
it at call.end and removes it once empty (or keeps it, `lingering`, until
its stragglers exit).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from agentcg.adapters.cgroupfs import CgroupFs, pid_cgroup
from agentcg.adapters.executor import Executor
from agentcg.core.config import DaemonConfig

from .state import SessionRecord

log = logging.getLogger("agentcg.daemon")

# call cgroups made ahead per session, after a reply
SPARE_CALL_CGROUPS = 1


class CallPool:
    def __init__(self, cfg: DaemonConfig, cgfs: CgroupFs, executor: Executor, mount: str | None,
                 sessions: Callable[[str], SessionRecord | None]):
        self.cfg = cfg
        self.cgfs = cgfs
        self.executor = executor
        self.mount = mount
        self._session = sessions
        # session -> numbers n of the empty c-<n> made ahead
        self.spares: dict[str, list[int]] = {}
        self.lingering: set[str] = set()        # kept call cgroups waiting for their stragglers
        self.stat_fds: dict[str, dict[str, int]] = {}   # call cgroup -> its accounting files, opened ahead

    # -- the spare pool ----------------------------------------------------------
    def _mkdir(self, rel: str) -> bool:
        """Make a spare call cgroup and open its accounting files (the call's
        end then reads each with one pread); False if it cannot be made."""
        try:
            self.cgfs.create(rel)
            self.oom_group(rel)
        except OSError as exc:
            log.warning("cannot make a spare call cgroup %s: %s", rel, exc)
            return False
        fds = self.cgfs.open_stats(rel)
        if fds is not None:
            self.stat_fds[rel] = fds
        return True

    def refill(self, name: str) -> None:
        """Make the session's next call cgroup ahead, after the reply that
        took the last one (on the loop: the client is starting its command
        meanwhile; a hop to a worker thread and back costs more than the
        mkdir). A crash leaves at most an empty c-<n> without a record:
        restore removes it."""
        s = self._session(name)
        if s is None:
            return
        spares = self.spares.setdefault(name, [])
        while len(spares) < SPARE_CALL_CGROUPS:
            n = s.next_call
            if not self._mkdir(f"{s.rel}/c-{n}"):
                return            # made at call.start instead
            s.next_call = n + 1
            spares.append(n)

    def drop_spares(self, name: str) -> None:
        s = self._session(name)
        for n in self.spares.pop(name, []):
            if s is not None:
                self.forget_fds(f"{s.rel}/c-{n}")

    def take(self, s: SessionRecord) -> int:
        """The number of a fresh, empty call cgroup: the spare made ahead if
        there is one (its accounting files open in stat_fds), else made now
        (under the spare's number if it vanished, so that calls stay
        numbered in order)."""
        spares = self.spares.get(s.name)
        if spares:
            n = spares.pop(0)
            if self.cgfs.exists(f"{s.rel}/c-{n}"):
                return n
            self.forget_fds(f"{s.rel}/c-{n}")
        else:
            n = s.next_call
            s.next_call += 1
        self.cgfs.create(f"{s.rel}/c-{n}")
        self.oom_group(f"{s.rel}/c-{n}")
        return n

    def fds(self, rel: str) -> dict[str, int] | None:
        return self.stat_fds.get(rel)

    def forget_fds(self, rel: str) -> None:
        self.cgfs.close_fds(self.stat_fds.pop(rel, None))

    # -- the end of a call ---------------------------------------------------------
    async def reap(self, rel: str, n: int, reason: str, *, force_kill: bool) -> tuple[int, str | None]:
        """Wait for or kill the processes left in a call's cgroup after its
        root exited: (how many were left, "killed" | "kept" | None)."""
        fds = self.stat_fds.get(rel)
        policy = "kill" if force_kill else self.cfg.straggler_policy
        if not self.cgfs.populated(rel, fds):
            return 0, None
        if policy == "kill" and not force_kill:
            deadline = time.monotonic() + self.cfg.straggler_grace_ms / 1000
            while self.cgfs.populated(rel, fds) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        left = self.cgfs.procs(rel)
        if not left:
            return 0, None
        if policy != "kill":
            return len(left), "kept"
        self.executor.kill(rel, f"call {n} ended ({reason}): {len(left)} stragglers")
        deadline = time.monotonic() + 5.0
        while self.cgfs.populated(rel, fds) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return len(left), "killed"

    def keep(self, rel: str) -> None:
        """A call cgroup kept for its stragglers: removed once they exit (sweep)."""
        self.executor.forget(rel)
        self.forget_fds(rel)
        self.lingering.add(rel)

    def remove_ended(self, rel: str) -> None:
        """rmdir an ended call's cgroup after its reply went out (on the loop:
        an rmdir of an empty cgroup costs less than a hop to the worker thread
        and back; the kernel frees the cgroup's state asynchronously)."""
        self.executor.forget(rel)
        self.cgfs.close_fds(self.stat_fds.pop(rel, None))
        try:
            ok = self.cgfs.remove(rel)
        except OSError as exc:
            log.warning("cannot remove %s: %s; retrying", rel, exc)
            ok = False
        if not ok:
            self.lingering.add(rel)   # busy: the watch retries

    def sweep(self) -> None:
        """Remove kept cgroups whose stragglers have exited."""
        for rel in list(self.lingering):
            if not self.cgfs.populated(rel) and self.cgfs.remove(rel):
                self.lingering.discard(rel)

    # -- where a pid is ----------------------------------------------------------------
    def in_cgroup(self, pid: int, rel: str) -> bool:
        """Whether pid (alive or a zombie: /proc/<pid>/cgroup still names it) is in rel.
        First through the call's cgroup.procs opened ahead (one pread, lists the
        living); /proc/<pid>/cgroup (which waits for the kernel's cgroup mutex,
        busy right after a clone into a cgroup or an rmdir) for the rest."""
        fds = self.stat_fds.get(rel)
        if fds is not None and pid in self.cgfs.procs(rel, fds):
            return True
        cg = pid_cgroup(pid)
        if cg is None:
            return False
        if self.mount is not None:
            return os.path.normpath(self.mount.rstrip("/") + cg) == os.path.normpath(str(self.cgfs.path(rel)))
        return pid in self.cgfs.procs(rel)

    # -- the OOM killer's preference: a tool call, never the agent ----------
    def oom_group(self, rel: str) -> None:
        """memory.oom.group = 1 on a call cgroup: a kernel OOM kill takes the
        whole call (never leaves half a build running)."""
        if self.cfg.call_oom_group:
            self.executor.oom_group(rel)

    def oom_prefer(self, pid: int, role: str, session: Any = None) -> None:
        """oom_score_adj of a placed process: daemon.agent_oom_score_adj for an
        agent (role "agent"); for a tool call, call_oom_score_adj raised by its
        session's distance from the highest priority. Only on a real cgroup2
        tree (fake trees in tests hold no such processes)."""
        if self.mount is None:
            return
        self.executor.oom_score_adj(pid, self.cfg.agent_oom_score_adj if role == "agent"
                                    else self.call_oom_adj(session))

    def call_oom_adj(self, session: Any) -> int:
        return self.cfg.call_oom_score_adj_for(session.intent.priority if session is not None else None)
