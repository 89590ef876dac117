"""procfs.py, the only reader of /proc: a process's status and cgroup and the
mount table, from a fake /proc tree (and this process's own entries)."""
from __future__ import annotations

import os

from agentcg.adapters.hierarchy import parse_proc_cgroup
from agentcg.adapters.procfs import mounts_text, pid_cgroup_text, proc_status


def test_status_and_cgroup_of_a_fake_proc_tree(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tpytest\nUid:\t1000\t1000\t1000\t1000\nState:\tS (sleeping)\n")
    (tmp_path / "42" / "cgroup").write_text("0::/agentcg/s-a/c-1\n")
    st = proc_status(42, proc=str(tmp_path))
    assert st["Name"] == "pytest" and st["Uid"].split()[0] == "1000" and st["State"] == "S (sleeping)"
    assert parse_proc_cgroup(pid_cgroup_text(42, proc=str(tmp_path))) == "/agentcg/s-a/c-1"
    assert proc_status(43, proc=str(tmp_path)) is None          # gone
    assert pid_cgroup_text(43, proc=str(tmp_path)) is None


def test_own_process_and_mount_table():
    assert proc_status(os.getpid())["Pid"] == str(os.getpid())
    assert pid_cgroup_text("self") is not None
    assert any(line.split()[1] == "/proc" for line in mounts_text().splitlines() if len(line.split()) > 1)
