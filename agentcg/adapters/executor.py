"""The one writer of the cgroup tree: every limit, policy action, freeze,
kill, process move and OOM preference goes through an `Executor`.

Each value write is logged with old -> new and its reason, and the value
written is remembered per (cgroup, file). A file that no longer holds what
this executor last wrote was changed by hand (an administrator's echo): the
change is logged once and respected, never overwritten by the policy, until
the call or session ends (`forget`). In dry-run a write is only logged.

`apply(action, dry_run=...)` returns what it did, or what it would do, as one
line with old -> new and the reason. A cgroup that vanished in between (the
call ended) is reported as "gone", not raised.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from agentcg.adapters.cgroupfs import GONE_ERRNOS, CgroupFs, CgroupGone
from agentcg.adapters.procfs import set_oom_score_adj
from agentcg.core.policy.model import Action

log = logging.getLogger("agentcg.policy")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# files whose value is a setting that reads back: a hand-made change of them is respected
WRITE_ONLY = frozenset({"cgroup.kill", "cgroup.procs", "cgroup.subtree_control"})


@dataclass(frozen=True)
class Applied:
    action: Action
    outcome: str  # "done" | "dry-run" | "gone" | "manual" | "failed: ..."
    t_ns: int

    def line(self) -> str:
        prefix = "would set " if self.outcome == "dry-run" else ""
        suffix = "" if self.outcome in ("done", "dry-run") else f" [{self.outcome}]"
        return f"{prefix}{self.action.render()}{suffix}"

    def to_dict(self) -> dict:
        d = self.action.to_dict()
        d.update(outcome=self.outcome, t_ns=self.t_ns, line=self.line())
        return d


def _text(value) -> str:
    return "max" if value is None else str(value)


def same_value(read: str, written: str) -> bool:
    """Whether a file that reads `read` still holds `written` (the kernel keeps
    memory limits in pages: a byte count reads back rounded down to a page)."""
    a, b = read.split(), written.split()
    if a == b:
        return True
    if len(a) == len(b) == 1 and a[0].isdigit() and b[0].isdigit():
        return int(a[0]) // PAGE_BYTES == int(b[0]) // PAGE_BYTES
    return False


class ManualChange(Exception):
    """The file was changed by hand since this executor wrote it: left alone."""


class Executor:
    def __init__(self, cgfs: CgroupFs, *, dry_run: bool = False):
        self.cgfs = cgfs
        self.dry_run = dry_run
        self.last: dict[tuple[str, str], str] = {}     # (cgroup, file) -> the value last written
        self.manual: dict[tuple[str, str], str] = {}   # (cgroup, file) -> the value found instead

    # -- one value ------------------------------------------------------------------
    def set(self, rel: str, name: str, value: str, reason: str = "", *, dry_run: bool | None = None,
            level: int = logging.INFO) -> str | None:
        """Write value into rel's interface file `name`; returns the old value.
        ManualChange (and no write) if the file holds something else than what
        was last written here; CgroupGone if the cgroup vanished. The line
        old -> new (reason) is logged at `level`."""
        key = (rel, name)
        if key in self.manual:
            raise ManualChange(f"{name} on {rel or '.'} changed by hand to {self.manual[key]}")
        old = self._read(rel, name)
        if name not in WRITE_ONLY and old is not None and key in self.last and \
                not same_value(old, self.last[key]):
            self.manual[key] = old
            self.cgfs.log.warning("%s on %s changed by hand (%s -> %s): respected, not written again until %s ends",
                        name, rel or ".", self.last[key], old, rel or "the tree")
            raise ManualChange(f"{name} on {rel or '.'} changed by hand to {old}")
        if self.dry_run if dry_run is None else dry_run:
            self.cgfs.log.info("would set %s %s -> %s on %s%s", name, old if old is not None else "-", value,
                     rel or ".", f" ({reason})" if reason else "")
            return old
        self.cgfs._write(rel, name, value)
        if name not in WRITE_ONLY:
            self.last[key] = value
        self.cgfs.log.log(level, "%s %s -> %s on %s%s", name, old if old is not None else "-", value,
                rel or ".", f" ({reason})" if reason else "")
        return old

    def _read(self, rel: str, name: str) -> str | None:
        if name in WRITE_ONLY:
            return None
        try:
            old = self.cgfs.read(rel, name)
        except OSError:
            return None
        return None if old is None else old.strip()

    def forget(self, rel: str) -> None:
        """rel ended (and everything below it): what was written there, and
        any hand-made change found, no longer counts."""
        below = rel + "/"
        for table in (self.last, self.manual):
            for key in [k for k in table if k[0] == rel or k[0].startswith(below)]:
                del table[key]

    # -- what the daemon writes ------------------------------------------------------
    def apply_limits(self, rel: str, files: dict[str, str], reason: str = "") -> dict[str, list]:
        """Write limit files. A file that does not exist (its controller is
        not enabled here) is skipped and reported, not an error."""
        applied: list[tuple[str, str | None, str]] = []
        skipped: list[str] = []
        for name, value in files.items():
            if not os.path.exists(self.cgfs._f(rel, name)):
                if not self.cgfs.exists(rel):
                    raise CgroupGone(rel)
                skipped.append(name)
                continue
            try:
                applied.append((name, self.set(rel, name, value, reason, dry_run=False), value))
            except ManualChange:
                skipped.append(name)
        return {"applied": applied, "skipped": skipped}

    def enable_controllers(self, rel: str, wanted: Iterable[str]) -> set[str]:
        """Enable in rel's cgroup.subtree_control each wanted controller its
        cgroup.controllers offers. Returns the ones enabled now."""
        offered = self.cgfs.controllers(rel)
        have = self.cgfs.subtree_control(rel)
        todo = [c for c in wanted if c in offered and c not in have]
        if todo:
            self.set(rel, "cgroup.subtree_control", " ".join(f"+{c}" for c in todo),
                     "enable controllers for children", dry_run=False)
        return self.cgfs.subtree_control(rel)

    def enable_down_to_root(self, mount: str | Path, wanted: Iterable[str]) -> set[str]:
        """Enable `wanted` in every cgroup from the cgroup2 `mount` down to
        the tree root's parent, so that the root itself offers them."""
        wanted = list(wanted)
        mount = Path(mount)
        try:
            parts = self.cgfs.root.relative_to(mount).parts
        except ValueError:
            raise ValueError(f"cgroup root {self.cgfs.root} is not under the cgroup2 mount {mount}") from None
        cur = mount
        for part in parts:
            try:
                Executor(CgroupFs(cur, self.cgfs.log)).enable_controllers("", wanted)
            except OSError as exc:
                log.warning("cannot enable %s in %s: %s", wanted, cur, exc)
            cur = cur / part
        return self.cgfs.controllers("")

    def place(self, rel: str, pid: int) -> None:
        """Move `pid` into the cgroup. ProcessLookupError if the pid is gone."""
        try:
            self.cgfs._write(rel, "cgroup.procs", str(pid))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError(pid) from None
            raise

    def entry_file(self, rel: str) -> str:
        """The cgroup.procs a child writes "0" to before its exec, to enter
        the cgroup itself (a supervised child such as the worker: it runs
        nothing outside, as a clone into the cgroup would)."""
        return str(self.cgfs.path(rel) / "cgroup.procs")

    def place_at(self, path: str | Path, pid: int) -> None:
        """Move `pid` into a cgroup outside the tree (an agent back to where it came from)."""
        Executor(CgroupFs(path, self.cgfs.log)).place("", pid)

    def freeze(self, rel: str, reason: str = "") -> None:
        self.set(rel, "cgroup.freeze", "1", reason, dry_run=False)

    def thaw(self, rel: str, reason: str = "") -> None:
        self.set(rel, "cgroup.freeze", "0", reason, dry_run=False)

    def kill(self, rel: str, reason: str = "") -> int:
        """Kill every process in the cgroup (cgroup.kill, or SIGKILL to each
        listed pid on kernels without it). Returns how many were listed."""
        pids = self.cgfs.procs(rel)
        if os.path.exists(self.cgfs._f(rel, "cgroup.kill")):
            try:
                self.set(rel, "cgroup.kill", "1", reason, dry_run=False)
            except CgroupGone:
                return 0
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return len(pids)

    def oom_group(self, rel: str) -> None:
        """memory.oom.group = 1: a kernel OOM kill takes the whole cgroup."""
        try:
            self.set(rel, "memory.oom.group", "1", "OOM kills take the whole call", dry_run=False,
                     level=logging.DEBUG)
        except (OSError, ManualChange):
            pass  # no memory controller here: nothing to group

    def oom_score_adj(self, pid: int, value: int) -> bool:
        """The OOM killer's preference of a process placed in the tree."""
        return set_oom_score_adj(pid, value)

    # -- the policy's actions -----------------------------------------------------------
    def apply(self, action: Action, *, dry_run: bool) -> Applied:
        now = time.monotonic_ns()
        if dry_run:
            applied = Applied(action, "dry-run", now)
            log.info("%s", applied.line())
            return applied
        try:
            if action.kind == "set":
                knob, value = action.knob, _text(action.new)
            elif action.kind in ("freeze", "thaw"):
                knob, value = "cgroup.freeze", "1" if action.kind == "freeze" else "0"
            elif action.kind == "kill":
                leaf = action.target.rsplit("/", 1)[-1]
                if not leaf.startswith("c-"):
                    raise ValueError(f"refusing to kill {action.target}: not a tool call")
                knob, value = "cgroup.kill", "1"
            else:
                raise ValueError(f"action kind {action.kind!r} unknown")
            # the Applied line below says what was done and why
            self.set(action.target, knob, value, dry_run=False, level=logging.DEBUG)
            outcome = "done"
        except ManualChange:
            outcome = "manual"
        except CgroupGone:
            outcome = "gone"
        except OSError as exc:
            outcome = "gone" if exc.errno in GONE_ERRNOS else f"failed: {exc.strerror}"
        applied = Applied(action, outcome, time.monotonic_ns())
        log.info("%s", applied.line())
        return applied
