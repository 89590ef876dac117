"""The executor, the one writer of the cgroup tree, over a tree of plain
files: a value changed by hand since it was written is detected, logged once
and left alone until the cgroup's call ends; and no other code in the
project writes cgroup files."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from agentcg.adapters.cgroupfs import CgroupFs
from agentcg.adapters.executor import Executor, ManualChange
from agentcg.core.policy.model import Action, Reason

import pytest

REPO = Path(__file__).resolve().parents[2]


def _call(tmp_path: Path) -> Path:
    d = tmp_path / "s-a" / "c-1"
    d.mkdir(parents=True)
    for name in ("memory.high", "memory.max", "cgroup.freeze"):
        (d / name).write_text("max\n" if name != "cgroup.freeze" else "0\n")
    return d


def _high(new: int) -> Action:
    return Action("set", "s-a/c-1", "memory.high", None, new, Reason("burst_borrow", "test"))


def test_a_value_changed_by_hand_is_respected_until_the_call_ends(tmp_path, caplog):
    d = _call(tmp_path)
    ex = Executor(CgroupFs(tmp_path))
    ex.apply_limits("s-a/c-1", {"memory.high": str(64 << 20)}, "admission")
    assert (d / "memory.high").read_text() == str(64 << 20)
    assert ex.apply(_high(128 << 20), dry_run=False).outcome == "done"
    assert (d / "memory.high").read_text() == str(128 << 20)

    (d / "memory.high").write_text(f"{1 << 30}\n")          # an administrator's echo
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert ex.apply(_high(96 << 20), dry_run=False).outcome == "manual"
    assert (d / "memory.high").read_text().strip() == str(1 << 30)   # never overwritten
    warnings = [r for r in caplog.records if "changed by hand" in r.getMessage()]
    assert len(warnings) == 1 and str(1 << 30) in warnings[0].getMessage()
    with pytest.raises(ManualChange):
        ex.set("s-a/c-1", "memory.high", "max", "another rule")
    assert ex.apply_limits("s-a/c-1", {"memory.high": "1"})["skipped"] == ["memory.high"]

    ex.forget("s-a/c-1")                                    # the call ended: its number is reused
    assert ex.apply(_high(96 << 20), dry_run=False).outcome == "done"
    assert (d / "memory.high").read_text() == str(96 << 20)


def test_a_page_rounded_read_back_and_a_dry_run_are_not_changes_by_hand(tmp_path):
    d = _call(tmp_path)
    ex = Executor(CgroupFs(tmp_path))
    ex.set("s-a/c-1", "memory.max", str((64 << 20) + 5))
    (d / "memory.max").write_text(f"{64 << 20}\n")           # what the kernel shows: whole pages
    assert ex.apply(Action("set", "s-a/c-1", "memory.max", None, 32 << 20, Reason("r", "m")),
                    dry_run=False).outcome == "done"
    assert ex.apply(Action("freeze", "s-a/c-1", "cgroup.freeze", 0, 1, Reason("r", "m")),
                    dry_run=True).outcome == "dry-run"
    assert (d / "cgroup.freeze").read_text() == "0\n"
    dry = Executor(CgroupFs(tmp_path), dry_run=True)
    dry.set("s-a/c-1", "memory.max", "max")
    assert (d / "memory.max").read_text() == str(32 << 20)


# what writes a file: a cgroup interface file may only be written by these two modules
WRITERS = {"agentcg/adapters/cgroupfs.py", "agentcg/adapters/executor.py"}
WRITE_CALL = re.compile(
    r"\._write\(|\bcgfs\.(write|place|apply_limits|enable_controllers|enable_down_to_root|freeze|thaw|kill)\("
    r"|cgroup\.(procs|kill|freeze|subtree_control)\"?\)?\.write_text\(|/ \"cgroup\.procs\"\)")
CGROUP_FILE = re.compile(r"cgroup\.(procs|kill|freeze|subtree_control)|memory\.(high|max|low|oom\.group)"
                         r"|cpu\.(weight|max)|pids\.max|io\.weight")
OPEN_W = re.compile(r"open\([^)]*[\"'][wa]b?\+?[\"']|write_text\(|os\.write\(")


def test_no_code_outside_the_adapter_and_the_executor_writes_cgroup_files():
    found = []
    for top in ("agentcg", "daemon", "cli"):
        for f in sorted((REPO / top).rglob("*.py")):
            rel = str(f.relative_to(REPO))
            if rel in WRITERS:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if WRITE_CALL.search(line) or (OPEN_W.search(line) and CGROUP_FILE.search(line)):
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []
