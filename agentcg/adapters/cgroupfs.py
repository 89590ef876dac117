"""The only code that touches cgroupfs (cgroup v2 interface files).

`CgroupFs(root)` works below one directory: the daemon's delegated subtree on
a real host, a `tmp_path` tree in tests. Paths given to its methods are
relative to that root ("s-build/c-3"). A cgroup that vanished under us
(FileNotFoundError, ENODEV) is "gone": reads return None, removal counts as
done, writes raise `CgroupGone`. Every limit change is logged as old -> new
with its reason.

Hierarchy detection (HierarchyInfo, detect_hierarchy, mount_of, pid_cgroup)
lives in hierarchy.py and is re-exported here for the daemon's imports.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from agentcg.adapters.cgroupview import parse_flat_keyed, parse_int, view_from
from agentcg.adapters.hierarchy import (  # noqa: F401  (re-exported: callers import them from here)
    HierarchyInfo, classify, detect_hierarchy, mount_of, parse_mounts, parse_proc_cgroup, pid_cgroup,
)
from agentcg.core.policy.model import CgroupView

GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)
# what read_stats and populated read: opened ahead for a spare call cgroup (open_stats)
# (and cgroup.procs: whether a pid named by the client is inside)
STAT_FILES = ("cgroup.events", "cgroup.procs", "cpu.stat", "memory.peak", "memory.current", "memory.events",
              "pids.peak", "pids.events", "io.stat")
MANAGED_CONTROLLERS = ("cpu", "memory", "pids", "io")
# the tree is root's: only the daemon writes limits and moves processes
CGROUP_DIR_MODE = 0o755

log = logging.getLogger("agentcg.cgroupfs")


class CgroupGone(Exception):
    """The cgroup does not exist (any more)."""


class CgroupError(OSError):
    """The kernel refused a cgroup operation; the message says which file."""


def _gone(exc: OSError) -> bool:
    return exc.errno in GONE_ERRNOS


# -- the subtree ---------------------------------------------------------------

def _parse_io_stat(text: str) -> tuple[int, int]:
    rbytes = wbytes = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                rbytes += int(value)
            elif key == "wbytes":
                wbytes += int(value)
    return rbytes, wbytes


class CgroupFs:
    """cgroup v2 operations below `root`. Relative paths name cgroups."""

    def __init__(self, root: str | Path, logger: logging.Logger | None = None):
        self.root = Path(root)
        self._root = str(self.root).rstrip("/") or "/"
        self.log = logger or log

    def _f(self, rel: str, name: str = "") -> str:
        """Path string of a cgroup (or one of its files); the hot path avoids pathlib."""
        base = f"{self._root}/{rel}" if rel else self._root
        return f"{base}/{name}" if name else base

    def path(self, rel: str = "") -> Path:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"cgroup path: {rel!r} is not relative to the root")
        return self.root / rel if rel else self.root

    # -- reading --------------------------------------------------------
    def open_stats(self, rel: str) -> dict[str, int] | None:
        """Descriptors of the cgroup's STAT_FILES that exist, opened ahead (a
        spare call cgroup, off the request path): `read(..., fds=)` then costs
        one pread each. A file missing now (its controller is not enabled
        here) is taken as missing later too. None when one cannot be opened
        for another reason (out of descriptors): read by path then. The
        caller closes them (close_fds)."""
        fds: dict[str, int] = {}
        for name in STAT_FILES:
            try:
                fds[name] = os.open(self._f(rel, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self.close_fds(fds)
                    self.log.warning("cannot open %s of %s ahead (%s); read by path", name, rel or ".", exc)
                    return None
        return fds

    @staticmethod
    def close_fds(fds: dict[str, int | None] | None) -> None:
        """Close every descriptor of `fds` (None entries: files that were missing)."""
        for fd in (fds or {}).values():
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def read(self, rel: str, name: str, fds: dict[str, int] | None = None) -> str | None:
        """An interface file's text, or None when it (or the cgroup) is gone.
        With `fds` (open_stats), through the descriptor opened ahead."""
        if fds is not None and name in STAT_FILES:
            fd = fds.get(name)
            if fd is None:
                return None
            try:
                return os.pread(fd, 65536, 0).decode()
            except OSError as exc:
                if _gone(exc):
                    return None
                raise
        try:
            with open(self._f(rel, name)) as f:
                return f.read()
        except OSError as exc:
            if _gone(exc):
                return None
            raise

    def read_int(self, rel: str, name: str, fds: dict[str, int] | None = None) -> int | None:
        """A single-value file as an int; None for "max", absent or not a number."""
        return parse_int(self.read(rel, name, fds))

    def read_view(self, rel: str) -> CgroupView:
        """The policy core's view of one cgroup, read by path. Its
        events_delta is empty: a delta needs the previous reading, which a
        cgroupview.ViewReader keeps (the policy loop reads through one)."""
        return view_from(rel, self)

    def exists(self, rel: str = "") -> bool:
        return os.path.isdir(self._f(rel))

    def children(self, rel: str = "") -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.path(rel)) if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            if _gone(exc):
                return []
            raise

    def controllers(self, rel: str = "") -> set[str]:
        return set((self.read(rel, "cgroup.controllers") or "").split())

    def subtree_control(self, rel: str = "") -> set[str]:
        return set((self.read(rel, "cgroup.subtree_control") or "").split())

    def procs(self, rel: str, fds: dict[str, int] | None = None) -> list[int]:
        text = self.read(rel, "cgroup.procs", fds)
        return [int(x) for x in text.split()] if text else []

    def events(self, rel: str, fds: dict[str, int] | None = None) -> dict[str, int] | None:
        text = self.read(rel, "cgroup.events", fds)
        return None if text is None else parse_flat_keyed(text)

    def populated(self, rel: str, fds: dict[str, int] | None = None) -> bool | None:
        """True/False, or None when the cgroup is gone."""
        ev = self.events(rel, fds)
        if ev is None:
            return None
        return bool(ev.get("populated", 0))

    def read_stats(self, rel: str, fds: dict[str, int] | None = None) -> dict[str, Any]:
        """Accounting of one cgroup, named as `CallStats` fields. Values a
        kernel or controller set does not offer are None. `fds`: see open_stats."""
        stats: dict[str, Any] = {}
        cpu = self.read(rel, "cpu.stat", fds)
        kv = parse_flat_keyed(cpu) if cpu is not None else {}
        stats["cpu_usage_usec"] = kv.get("usage_usec")
        stats["cpu_user_usec"] = kv.get("user_usec")
        stats["cpu_system_usec"] = kv.get("system_usec")
        stats["cpu_nr_throttled"] = kv.get("nr_throttled")
        stats["cpu_throttled_usec"] = kv.get("throttled_usec")
        stats["memory_peak_bytes"] = self.read_int(rel, "memory.peak", fds)
        stats["memory_current_bytes"] = self.read_int(rel, "memory.current", fds)
        mev = self.read(rel, "memory.events", fds)
        stats["memory_events"] = parse_flat_keyed(mev) if mev is not None else {}
        stats["pids_peak"] = self.read_int(rel, "pids.peak", fds)
        pev = self.read(rel, "pids.events", fds)
        stats["pids_events_max"] = parse_flat_keyed(pev).get("max") if pev is not None else None
        io = self.read(rel, "io.stat", fds)
        if io is not None:
            stats["io_read_bytes"], stats["io_write_bytes"] = _parse_io_stat(io)
        else:
            stats["io_read_bytes"] = stats["io_write_bytes"] = None
        return stats

    def read_limits(self, rel: str) -> dict[str, int | None]:
        """Current limits as `Limits` fields (None = "max" or not available)."""
        def weight(name: str) -> int | None:
            text = self.read(rel, name)
            if not text:
                return None
            for tok in text.split():
                if tok.isdigit():
                    return int(tok)
            return None
        cpu_max = None
        text = self.read(rel, "cpu.max")
        if text and not text.startswith("max"):
            quota, period = text.split()[:2]
            cpu_max = int(quota) * 100 // int(period)
        return {"memory_high_bytes": self.read_int(rel, "memory.high"),
                "memory_max_bytes": self.read_int(rel, "memory.max"),
                "memory_low_bytes": self.read_int(rel, "memory.low") or None,
                "cpu_weight": weight("cpu.weight"), "cpu_max_pct": cpu_max,
                "pids_max": self.read_int(rel, "pids.max"), "io_weight": weight("io.weight")}

    def created_time(self, rel: str) -> float | None:
        """When the cgroup directory was made (wall clock), or None if gone."""
        try:
            return os.stat(self.path(rel)).st_ctime
        except OSError:
            return None

    # -- writing --------------------------------------------------------
    def _write(self, rel: str, name: str, value: str) -> None:
        try:
            with open(self._f(rel, name), "w") as f:
                f.write(value)
        except OSError as exc:
            if _gone(exc) and not self.exists(rel):
                raise CgroupGone(rel) from None
            raise

    def write(self, rel: str, name: str, value: str, reason: str = "") -> tuple[str | None, str]:
        """Write one interface file, logging old -> new and why."""
        try:
            old = self.read(rel, name)
        except OSError:  # write-only files (cgroup.kill) cannot be read
            old = None
        old_s = None if old is None else old.strip()
        self._write(rel, name, value)
        self.log.info("%s %s -> %s on %s%s", name, old_s if old_s is not None else "-", value,
                      rel or ".", f" ({reason})" if reason else "")
        return old_s, value

    def apply_limits(self, rel: str, files: dict[str, str], reason: str = "") -> dict[str, list]:
        """Write limit files. A file that does not exist (its controller is
        not enabled here) is skipped and reported, not an error."""
        applied: list[tuple[str, str | None, str]] = []
        skipped: list[str] = []
        for name, value in files.items():
            if not os.path.exists(self._f(rel, name)):
                if not self.exists(rel):
                    raise CgroupGone(rel)
                skipped.append(name)
                continue
            old, new = self.write(rel, name, value, reason)
            applied.append((name, old, new))
        return {"applied": applied, "skipped": skipped}

    def create(self, rel: str) -> Path:
        """mkdir the cgroup 0755 whatever the daemon's umask (which can only
        take bits away): a group- or world-writable cgroup directory would let
        any uid make cgroups inside sessions and calls (and keep them from
        being removed). Its files are the kernel's, root's and 0644 or stricter."""
        p = self.path(rel)
        try:
            p.mkdir(mode=CGROUP_DIR_MODE)
        except FileExistsError:
            pass
        return p

    def enable_controllers(self, rel: str, wanted: Iterable[str]) -> set[str]:
        """Enable in `rel`'s cgroup.subtree_control each wanted controller its
        cgroup.controllers offers. Returns the ones enabled now."""
        offered = self.controllers(rel)
        have = self.subtree_control(rel)
        todo = [c for c in wanted if c in offered and c not in have]
        if todo:
            self.write(rel, "cgroup.subtree_control", " ".join(f"+{c}" for c in todo),
                       "enable controllers for children")
        return self.subtree_control(rel)

    def enable_down_to_root(self, mount: str | Path, wanted: Iterable[str]) -> set[str]:
        """Enable `wanted` in every cgroup from the cgroup2 `mount` down to
        this root's parent, so that the root itself offers them."""
        wanted = list(wanted)
        mount = Path(mount)
        try:
            parts = self.root.relative_to(mount).parts
        except ValueError:
            raise ValueError(f"cgroup root {self.root} is not under the cgroup2 mount {mount}") from None
        cur = mount
        for part in parts:
            parent = CgroupFs(cur, self.log)
            try:
                parent.enable_controllers("", wanted)
            except OSError as exc:
                self.log.warning("cannot enable %s in %s: %s", wanted, cur, exc)
            cur = cur / part
        return self.controllers("")

    def place(self, rel: str, pid: int) -> None:
        """Move `pid` into the cgroup. ProcessLookupError if the pid is gone."""
        try:
            self._write(rel, "cgroup.procs", str(pid))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError(pid) from None
            raise

    def open_dir(self, rel: str) -> int:
        """An O_RDONLY|O_DIRECTORY fd of the cgroup (for clone3's
        CLONE_INTO_CGROUP); the caller closes it. CgroupGone if it vanished."""
        try:
            return os.open(self._f(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if _gone(exc):
                raise CgroupGone(rel) from None
            raise

    def freeze(self, rel: str, reason: str = "") -> None:
        self.write(rel, "cgroup.freeze", "1", reason)

    def thaw(self, rel: str, reason: str = "") -> None:
        self.write(rel, "cgroup.freeze", "0", reason)

    def wait_unpopulated(self, rel: str, timeout_s: float) -> bool:
        """Poll cgroup.events until populated=0 (True) or timeout (False)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            pop = self.populated(rel)
            if not pop:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def remove(self, rel: str) -> bool:
        """rmdir one cgroup. True when removed or already gone; False while busy."""
        try:
            os.rmdir(self._f(rel))
            return True
        except OSError as exc:
            if _gone(exc):
                return True
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise

    def remove_tree(self, rel: str) -> bool:
        """Remove a cgroup and its child cgroups, deepest first."""
        ok = True
        for child in self.children(rel):
            ok = self.remove_tree(f"{rel}/{child}" if rel else child) and ok
        return self.remove(rel) and ok


class OpenFiles:
    """Interface files of many cgroups kept open between reads: a reader that
    looks at the same files of the same cgroups again and again (the policy
    loop, on every kernel signal) pays one pread per file instead of a path
    walk, an open and a close (about 8x less on a 6.x kernel; more under
    emulation). A file that does not exist (controller not enabled) is
    remembered as missing. A cgroup removed while its descriptors are open
    reads ENODEV: its descriptors are dropped and the read goes by path (so a
    cgroup made again at the same path is seen). `forget(rel)` closes a
    cgroup's descriptors and those below it; call it when the cgroup ends."""

    def __init__(self, cgfs: CgroupFs):
        self.cgfs = cgfs
        self._fds: dict[str, dict[str, int | None]] = {}

    def _fd(self, rel: str, name: str) -> int | None:
        files = self._fds.setdefault(rel, {})
        if name in files:
            return files[name]
        try:
            fd = os.open(self.cgfs._f(rel, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.cgfs.exists(rel):
                files[name] = None  # the cgroup is there, the file is not: missing for good
            return None
        files[name] = fd
        return fd

    def read(self, rel: str, name: str) -> str | None:
        """The file's text, or None when it (or the cgroup) is missing."""
        fd = self._fd(rel, name)
        if fd is None:
            return None
        try:
            return os.pread(fd, 65536, 0).decode()
        except OSError as exc:
            if not _gone(exc):
                raise
        self.forget(rel)
        return self.cgfs.read(rel, name)

    def forget(self, rel: str) -> None:
        """Close the descriptors of `rel` and of every cgroup below it."""
        below = f"{rel}/" if rel else ""
        self._drop([k for k in self._fds if k == rel or k.startswith(below)])

    def keep_only(self, rels: set[str]) -> None:
        """Close the descriptors of every cgroup not in `rels` (the ones a
        reader just looked at): whatever ended without a forget() is let go."""
        self._drop([k for k in self._fds if k not in rels])

    def _drop(self, keys: list[str]) -> None:
        for key in keys:
            CgroupFs.close_fds(self._fds.pop(key))

    def open_count(self) -> int:
        return sum(1 for files in self._fds.values() for fd in files.values() if fd is not None)

    def close(self) -> None:
        self._drop(list(self._fds))
