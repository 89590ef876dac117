"""The cgroupfs adapter against a fake tree in tmp_path."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agentcg.adapters.cgroupfs import (CgroupFs, CgroupGone, classify, parse_mounts,
                                       parse_proc_cgroup)
from agentcg.adapters.executor import Executor


def fake_cgroup(p: Path, files: dict[str, str]) -> None:
    p.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (p / name).write_text(text)


STATS = {
    "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_throttled 2\nthrottled_usec 300\n",
    "memory.peak": "104857600\n", "memory.current": "4096\n",
    "memory.events": "low 0\nhigh 3\nmax 1\noom 1\noom_kill 1\n",
    "pids.peak": "12\n", "pids.events": "max 4\n",
    "io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2\n8:16 rbytes=1 wbytes=2\n",
    "cgroup.events": "populated 1\nfrozen 0\n", "cgroup.procs": "11\n12\n",
    "memory.high": "max\n", "memory.max": "max\n",
}


def test_read_stats(tmp_path):
    fake_cgroup(tmp_path / "s-a" / "c-1", STATS)
    fs = CgroupFs(tmp_path)
    st = fs.read_stats("s-a/c-1")
    assert st["cpu_usage_usec"] == 1500 and st["cpu_nr_throttled"] == 2
    assert st["memory_peak_bytes"] == 100 << 20
    assert st["memory_events"]["oom_kill"] == 1 and st["memory_events"]["high"] == 3
    assert st["pids_peak"] == 12 and st["pids_events_max"] == 4
    assert (st["io_read_bytes"], st["io_write_bytes"]) == (101, 202)
    assert fs.populated("s-a/c-1") is True and fs.procs("s-a/c-1") == [11, 12]


def test_missing_files_are_none_and_gone_is_not_a_crash(tmp_path):
    fake_cgroup(tmp_path / "s-a", {"cgroup.events": "populated 0\n"})
    fs = CgroupFs(tmp_path)
    st = fs.read_stats("s-a")
    assert st["memory_peak_bytes"] is None and st["memory_events"] == {}
    assert fs.read_stats("s-gone")["cpu_usage_usec"] is None
    assert fs.populated("s-gone") is None
    assert fs.procs("s-gone") == []
    assert fs.remove("s-gone") is True
    assert fs.children("s-gone") == []
    with pytest.raises(CgroupGone):
        fs.write("s-gone", "memory.high", "1")


def test_apply_limits_logs_old_new_and_skips_missing_controllers(tmp_path, caplog):
    fake_cgroup(tmp_path / "s-a" / "c-1", {"memory.high": "max\n", "memory.max": "max\n"})
    fs = CgroupFs(tmp_path)
    with caplog.at_level(logging.INFO, logger="agentcg.cgroupfs"):
        res = fs.apply_limits("s-a/c-1", {"memory.high": "67108864", "pids.max": "10"}, "intent memory=64M")
    assert res["applied"] == [("memory.high", "max", "67108864")]
    assert res["skipped"] == ["pids.max"]
    assert (tmp_path / "s-a/c-1/memory.high").read_text() == "67108864"
    assert "memory.high max -> 67108864 on s-a/c-1 (intent memory=64M)" in caplog.text


def test_enable_controllers_only_offered(tmp_path):
    fake_cgroup(tmp_path, {"cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": ""})
    fs = CgroupFs(tmp_path)
    fs.enable_controllers("", ["cpu", "memory", "io"])
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"


def test_place_kill_freeze_write_files(tmp_path):
    fake_cgroup(tmp_path / "c", {"cgroup.procs": "", "cgroup.kill": "", "cgroup.freeze": "0\n"})
    fs = CgroupFs(tmp_path)
    fs.place("c", 1234)
    assert (tmp_path / "c/cgroup.procs").read_text() == "1234"
    fs.freeze("c")
    assert (tmp_path / "c/cgroup.freeze").read_text() == "1"
    fs.thaw("c")
    assert (tmp_path / "c/cgroup.freeze").read_text() == "0"
    Executor(fs).kill("c", "stragglers")   # the executor is the one that kills
    assert (tmp_path / "c/cgroup.kill").read_text() == "1"


def test_create_remove_tree(tmp_path):
    fs = CgroupFs(tmp_path)
    fs.create("s-a")
    fs.create("s-a/c-1")
    assert fs.children("s-a") == ["c-1"]
    assert fs.remove_tree("s-a") is True
    assert not (tmp_path / "s-a").exists()
    with pytest.raises(ValueError):
        fs.path("../etc")


HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_hybrid_is_refused_with_the_fix():
    mount, v1 = parse_mounts(HYBRID)
    info = classify(mount, v1, ["hugetlb"])
    assert info.kind == "hybrid" and info.cgroup2_mount == "/sys/fs/cgroup/unified"
    msg = info.refusal(["cpu", "memory", "pids"])
    assert "hybrid" in msg and "memory at /sys/fs/cgroup/memory" in msg
    assert "systemd.unified_cgroup_hierarchy=1" in msg and "cgroup_no_v1=all" in msg


def test_unified_with_controllers_is_accepted():
    info = classify("/sys/fs/cgroup", {}, ["cpu", "io", "memory", "pids"])
    assert info.kind == "unified" and info.refusal(["cpu", "memory", "pids"]) is None
    assert classify(None, {}, []).refusal() .startswith("agentcgd needs cgroup v2, but no cgroup2")
    assert classify(None, {"memory": "/m"}, []).kind == "legacy"


def test_parse_proc_cgroup():
    assert parse_proc_cgroup("4:memory:/x\n0::/system.slice/agentcgd.service\n") == \
        "/system.slice/agentcgd.service"
    assert parse_proc_cgroup("4:memory:/x\n") is None


def test_read_limits_back(tmp_path):
    fake_cgroup(tmp_path / "c", {"memory.high": "67108864\n", "memory.max": "max\n", "memory.low": "0\n",
                                 "cpu.weight": "400\n", "cpu.max": "50000 100000\n", "pids.max": "32\n",
                                 "io.weight": "default 200\n"})
    fs = CgroupFs(tmp_path)
    assert fs.read_limits("c") == {"memory_high_bytes": 64 << 20, "memory_max_bytes": None,
                                   "memory_low_bytes": None, "cpu_weight": 400, "cpu_max_pct": 50,
                                   "pids_max": 32, "io_weight": 200}
    assert fs.created_time("c") is not None and fs.created_time("gone") is None
