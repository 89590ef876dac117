"""OpenFiles (the policy loop's kept-open interface files) on this host's cgroup2:
one descriptor per file, fresh values through it, and a cgroup removed and
made again at the same path is read again, not through a dead descriptor."""
from __future__ import annotations


import pytest

from agentcg.adapters.cgroupfs import CgroupFs, OpenFiles

pytestmark = pytest.mark.kernel


def test_reads_follow_the_kernel_and_survive_remove_and_recreate(scratch):
    fs = CgroupFs(scratch)
    files = OpenFiles(fs)
    try:
        (scratch / "a").mkdir()
        assert files.read("a", "cgroup.freeze").strip() == "0"
        assert files.open_count() == 1
        (scratch / "a" / "cgroup.freeze").write_text("1")
        assert files.read("a", "cgroup.freeze").strip() == "1"   # same descriptor, the new value
        assert files.open_count() == 1
        assert files.read("a", "no.such.file") is None            # missing: remembered, nothing opened
        assert files.read("a", "no.such.file") is None
        assert files.open_count() == 1
        (scratch / "a" / "cgroup.freeze").write_text("0")
        (scratch / "a").rmdir()
        assert files.read("a", "cgroup.freeze") is None           # gone: ENODEV on the old descriptor
        assert files.open_count() == 0
        (scratch / "a").mkdir()
        (scratch / "a" / "cgroup.freeze").write_text("1")
        assert files.read("a", "cgroup.freeze").strip() == "1"    # the new cgroup at that path
        (scratch / "a" / "b").mkdir()
        files.read("a/b", "cgroup.freeze")
        assert files.open_count() == 2
        files.forget("a")                                          # a and everything below it
        assert files.open_count() == 0
        (scratch / "a" / "cgroup.freeze").write_text("0")
    finally:
        files.close()
