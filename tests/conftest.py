"""Shared test helpers: feature checks that skip, or fail under CI's kernel lab.

A kernel-tier test asks for what it needs through these helpers. Where the
feature is missing the test is skipped with the reason, except when
AGENTCG_REQUIRE_KERNEL=1 is set (the kernel-lab run in CI): there a missing
feature is a failure, so a broken lab cannot turn the kernel tier into a
silent row of skips.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CGROUP2_ROOT = Path("/sys/fs/cgroup")


def _missing(reason: str) -> None:
    if os.environ.get("AGENTCG_REQUIRE_KERNEL") == "1":
        pytest.fail(f"required kernel feature missing: {reason}")
    pytest.skip(reason)


def cgroup2_mount() -> Path | None:
    """The cgroup2 mount point, or None. Prefers a pure v2 /sys/fs/cgroup."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    points = [Path(m[1]) for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
    if CGROUP2_ROOT in points:
        return CGROUP2_ROOT
    return points[0] if points else None


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root")


def require_cgroup2_controllers(*names: str) -> Path:
    """Return the cgroup2 mount that offers all `names` (e.g. "memory", "pids")."""
    require_root()
    mnt = cgroup2_mount()
    if mnt is None:
        _missing("no cgroup2 mount")
    try:
        have = set((mnt / "cgroup.controllers").read_text().split())
    except OSError as exc:
        _missing(f"cannot read {mnt}/cgroup.controllers: {exc}")
    lacking = [n for n in names if n not in have]
    if lacking:
        _missing(f"cgroup2 at {mnt} lacks controllers {lacking} (hybrid/v1 host; run in the kernel lab)")
    return mnt


def require_cgroup2() -> Path:
    """Any cgroup2 mount (no controllers needed: freeze, kill, PSI, cgroup BPF)."""
    require_root()
    mnt = cgroup2_mount()
    if mnt is None:
        _missing("no cgroup2 mount")
    return mnt


def require_sched_ext() -> None:
    require_root()
    if not Path("/sys/kernel/sched_ext").is_dir():
        _missing("kernel has no sched_ext (/sys/kernel/sched_ext missing)")


def require_bpf() -> None:
    require_root()
    if not Path("/sys/kernel/btf/vmlinux").exists():
        _missing("kernel has no BTF (/sys/kernel/btf/vmlinux)")


def in_kernlab() -> bool:
    return os.environ.get("KERNLAB") == "1"


def daemon_dirs(request, mnt: Path) -> tuple[Path, Path]:
    """A test daemon's cgroup root below `mnt` and its runtime directory
    (made, mode 0755), both named after the test."""
    tag = f"agentcg-test-{os.getpid()}-{request.node.name[:20]}"
    runtime = Path("/tmp") / tag
    runtime.mkdir(mode=0o755, exist_ok=True)
    os.chmod(runtime, 0o755)
    return mnt / tag, runtime


def remove_daemon_tree(root: Path) -> None:
    """Kill and remove everything a test's agentcgd left below `root` (its
    sessions, each thawed first in case a test froze it, and its own leaf,
    where a helper of the daemon such as the BPF stop watchdog may still be
    exiting), then `root` itself."""
    from agentcg.adapters.cgroupfs import CgroupFs
    from agentcg.adapters.executor import Executor
    fs = CgroupFs(root)
    for rel in fs.children(""):
        if rel.startswith("s-"):
            try:
                fs.write(rel, "cgroup.freeze", "0")
            except OSError:
                pass
        Executor(fs).kill(rel)
        fs.wait_unpopulated(rel, 5)
        fs.remove_tree(rel)
    fs.remove_tree("")


def kill_and_remove(*cgroups: Path) -> None:
    """SIGKILL every process in each of `cgroups`, then rmdir them in the
    order given (children first)."""
    for cg in cgroups:
        for pid in (cg / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
    time.sleep(0.05)   # the killed leave their cgroup asynchronously
    for cg in cgroups:
        cg.rmdir()


@pytest.fixture
def scratch():
    """An empty cgroup of this test's own on any cgroup2 mount (no
    controllers needed), removed afterwards with whatever the test made
    below it, deepest first."""
    mnt = require_cgroup2()
    path = Path(mnt) / f"agentcg-test-{os.getpid()}"
    path.mkdir()
    yield path
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        child.rmdir()
    path.rmdir()
