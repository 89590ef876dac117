"""What cgroup hierarchy this host mounts, and where a process's cgroup is.

`detect_hierarchy()` tells a pure cgroup v2 host from a hybrid or v1 one and
`HierarchyInfo.refusal()` explains how to fix a host that cannot be managed.
The /proc files come through procfs.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agentcg.adapters.procfs import mounts_text, pid_cgroup_text


@dataclass(frozen=True)
class HierarchyInfo:
    """What this host mounts. kind: "unified" (pure v2), "hybrid" (v2 next to
    v1 controllers), "legacy" (v1 only) or "none"."""

    kind: str
    cgroup2_mount: str | None
    controllers: tuple[str, ...] = ()          # offered by the cgroup2 root
    v1_controllers: tuple[str, ...] = ()       # bound to v1 hierarchies
    v1_mounts: dict[str, str] = field(default_factory=dict)

    def missing(self, needed: Iterable[str]) -> list[str]:
        return [c for c in needed if c not in self.controllers]

    def refusal(self, needed: Iterable[str] = ("cpu", "memory", "pids")) -> str | None:
        """None when cgroup v2 offers every needed controller, else why not and how to fix it."""
        needed = list(needed)
        lacking = self.missing(needed)
        if self.cgroup2_mount and not lacking:
            return None
        fix = ("Fix: boot with 'systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all' on the kernel "
               "command line (e.g. add it to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, "
               "reboot), so that the v1 hierarchies release the controllers to cgroup v2. "
               "To run without enforcement (testing only), set daemon.require_controllers = false "
               "and daemon.cgroup_root to a directory under the cgroup2 mount.")
        if self.kind == "none":
            return "agentcgd needs cgroup v2, but no cgroup2 filesystem is mounted. " + fix
        held = [c for c in lacking if c in self.v1_controllers]
        where = ", ".join(f"{c} at {self.v1_mounts.get(c, '?')}" for c in held)
        head = (f"agentcgd needs cgroup v2 with the controllers {', '.join(needed)}, but this host's "
                f"hierarchy is {self.kind}: cgroup2 at {self.cgroup2_mount or '(not mounted)'} offers "
                f"[{' '.join(self.controllers)}] and lacks {', '.join(lacking)}")
        if held:
            head += f" (bound to cgroup v1: {where})"
        return head + ". " + fix

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cgroup2_mount": self.cgroup2_mount,
                "controllers": list(self.controllers), "v1_controllers": list(self.v1_controllers)}


def parse_mounts(text: str) -> tuple[str | None, dict[str, str]]:
    """/proc/self/mounts text -> (cgroup2 mount point or None, {v1 controller: mount})."""
    v2_points: list[str] = []
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point, fstype, opts = parts[1], parts[2], parts[3].split(",")
        if fstype == "cgroup2":
            v2_points.append(point)
        elif fstype == "cgroup":
            for opt in opts:
                if opt in ("cpu", "cpuacct", "memory", "pids", "blkio", "io", "cpuset", "freezer",
                           "devices", "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc"):
                    v1[opt] = point
    mount = "/sys/fs/cgroup" if "/sys/fs/cgroup" in v2_points else (v2_points[0] if v2_points else None)
    return mount, v1


def classify(mount: str | None, v1: dict[str, str], controllers: Iterable[str]) -> HierarchyInfo:
    ctrl = tuple(sorted(controllers))
    # blkio on v1 is the io controller of v2
    v1_names = tuple(sorted({"io" if c == "blkio" else c for c in v1}))
    v1_mounts = {("io" if c == "blkio" else c): p for c, p in v1.items()}
    if mount is None:
        kind = "legacy" if v1 else "none"
    elif v1:
        kind = "hybrid"
    else:
        kind = "unified"
    return HierarchyInfo(kind=kind, cgroup2_mount=mount, controllers=ctrl,
                         v1_controllers=v1_names, v1_mounts=v1_mounts)


def detect_hierarchy(proc_mounts: str | Path = "/proc/self/mounts") -> HierarchyInfo:
    mount, v1 = parse_mounts(mounts_text(str(proc_mounts)))
    controllers: list[str] = []
    if mount is not None:
        try:
            controllers = Path(mount, "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
    return classify(mount, v1, controllers)


def parse_proc_cgroup(text: str) -> str | None:
    """/proc/<pid>/cgroup text -> the cgroup v2 path ("0::/x/y" -> "/x/y")."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def pid_cgroup(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of a process, or None when it is gone."""
    text = pid_cgroup_text(pid)
    return None if text is None else parse_proc_cgroup(text)


def mount_of(path: str | Path, proc_mounts: str | Path = "/proc/self/mounts") -> str | None:
    """The cgroup2 mount point that contains `path`, or None."""
    p = os.path.abspath(str(path))
    best = None
    for line in mounts_text(str(proc_mounts)).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            point = parts[1].rstrip("/") or "/"
            if p == point or p.startswith(point + "/"):
                if best is None or len(point) > len(best):
                    best = point
    return best
