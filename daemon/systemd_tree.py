"""The cgroup tree's own systemd unit (systemd/agentcg-tree.service).

Before systemd 254 (DelegateSubgroup=) systemd starts a delegated service's
main process in the unit's own cgroup. Had the daemon built its tree there,
that cgroup would have controllers enabled for its children, and cgroup v2's
no-internal-process rule would refuse the new process: every restart would
fail with EBUSY (status 219/CGROUP). So the tree lives in a second unit that
is never restarted with the daemon: agentcg-tree.service, Delegate=yes, whose
only process is a holder (`sleep infinity`). The daemon finds that unit's
cgroup, moves the holder into a leaf of its own (so that controllers can be
enabled there) and builds root -> session -> call beside it; the daemon's own
unit cgroup keeps only the daemon, and systemd can place a new one there.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable

from agentcg.adapters.cgroupfs import CgroupFs
from agentcg.adapters.executor import Executor

log = logging.getLogger("agentcg.daemon")

HOLDER_LEAF = "holder"
SYSTEMCTL_TIMEOUT_S = 5.0


def control_group_of(unit: str) -> str:
    """`systemctl show -p ControlGroup --value UNIT`: the unit's cgroup below
    the cgroup2 mount, "" when the unit is inactive, unknown, or systemctl
    cannot be asked."""
    try:
        r = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit],
                           capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def tree_unit_cgroup(unit: str, own_unit_cgroup: str, mount: str,
                     show: Callable[[str], str] = control_group_of) -> str | None:
    """The directory of `unit`'s cgroup, or None where it has none (not
    installed, not started, or `unit` is ""). Looked up first as a sibling of
    the daemon's own unit cgroup `own_unit_cgroup` (both units sit in
    system.slice unless configured otherwise), then as systemd reports it
    (`show`, for a unit placed in another slice)."""
    if not unit:
        return None
    sibling = os.path.join(os.path.dirname(own_unit_cgroup.rstrip("/")), unit)
    if os.path.isdir(sibling):
        return sibling
    rel = show(unit)
    if rel.startswith("/"):
        path = mount.rstrip("/") + rel
        if os.path.isdir(path):
            return path
    return None


def find_tree_root(unit: str, own_unit_cgroup: str, mount: str) -> str | None:
    """tree_unit_cgroup(), with a warning where the tree has to stay in the
    daemon's own unit (no tree unit): restarts then fail on systemd < 254."""
    path = tree_unit_cgroup(unit, own_unit_cgroup, mount)
    if path is None:
        log.warning("tree unit %s not found (not installed or not started): building the tree in the "
                    "daemon's own cgroup %s; with systemd < 254 a restart of the daemon then fails "
                    "(\"Failed to attach to cgroup ...: Device or resource busy\") until the tree is gone. "
                    "Install systemd/agentcg-tree.service to avoid that", unit or '""', own_unit_cgroup)
    return path


def move_holder(cgfs: CgroupFs, executor: Executor) -> list[int]:
    """Move every process of the tree root's own cgroup (the tree unit's
    holder, where systemd started it) into <root>/holder: controllers can
    only be enabled for children of a cgroup with no processes of its own.
    Returns the pids moved; none after a daemon restart (moved already)."""
    cgfs.create(HOLDER_LEAF)
    moved = []
    for pid in cgfs.procs(""):
        try:
            executor.place(HOLDER_LEAF, pid)
        except ProcessLookupError:
            continue
        moved.append(pid)
    return moved
