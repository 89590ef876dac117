"""The only code that reads or writes /proc: the OOM killer's preference
(oom_score_adj), a process's status and cgroup, the mount table, and the
host's free swap.

The kernel's OOM killer (also the per-cgroup one that runs when a memory.max
is reached) kills the task with the largest badness: its resident memory
plus oom_score_adj/1000 of the memory the OOM applies to. agentcgd makes the
agent's own processes unattractive victims (a negative value; only root may
lower it, and a root write also sets the floor the process and its children
may later lower it to) and tool-call processes attractive ones (raising is
allowed to anyone), so that a full budget costs a tool call, never the agent.
A process that is gone is a normal result, not an error.
"""
from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("agentcg.procfs")

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000


def oom_score_adj_path(pid: int | str) -> str:
    return f"/proc/{pid}/oom_score_adj"


def set_oom_score_adj(pid: int, value: int, *, proc: str = "/proc") -> bool:
    """Write `value` to /proc/<pid>/oom_score_adj. False when the process is
    gone; other errors (EACCES for a non-root lowering) are logged and False."""
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise ValueError(f"oom_score_adj: {value} is outside -1000..1000")
    try:
        fd = os.open(f"{proc}/{pid}/oom_score_adj", os.O_WRONLY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot open oom_score_adj of pid %d: %s", pid, exc)
        return False
    try:
        os.write(fd, str(value).encode())
        return True
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            log.warning("cannot set oom_score_adj of pid %d to %d: %s", pid, value, exc)
        return False
    finally:
        os.close(fd)


def read_oom_score_adj(pid: int, *, proc: str = "/proc") -> int | None:
    try:
        with open(f"{proc}/{pid}/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def proc_status(pid: int, *, proc: str = "/proc") -> dict[str, str] | None:
    """/proc/<pid>/status as a dict, or None if the process is gone."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def pid_cgroup_text(pid: int | str = "self", *, proc: str = "/proc") -> str | None:
    """/proc/<pid>/cgroup text, or None when the process is gone."""
    try:
        fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def pid_exists(pid: int, *, proc: str = "/proc") -> bool:
    """Whether /proc has process pid (alive, or a zombie not yet reaped)."""
    return os.path.exists(f"{proc}/{pid}")


def mounts_text(path: str = "/proc/self/mounts") -> str:
    """The mount table (/proc/self/mounts, or a copy of it at `path`)."""
    with open(path) as f:
        return f.read()


def swap_free_bytes(*, proc: str = "/proc") -> int:
    """SwapFree of /proc/meminfo in bytes (0 when the host has no swap)."""
    try:
        with open(f"{proc}/meminfo") as f:
            for line in f:
                if line.startswith("SwapFree:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
