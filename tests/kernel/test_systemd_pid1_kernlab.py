"""systemd/agentcgd.service and systemd/agentcg-tree.service under a real
systemd PID 1.

A container is booted with `systemd-nspawn --boot` over this machine's own
/usr (`--volatile=yes`: a fresh tmpfs root, empty /etc), with the checkout and
its Python bind-mounted at the same paths. It boots into a one-shot check unit
that runs tests/kernel/pid1_checks.py: the shipped units are installed with a
drop-in naming this checkout's agentcgd (and WatchdogSec=10s), then agentcgd
is started, restarted, hung with SIGSTOP, stopped and started through
systemctl, with a session and tool calls of the real client running across
the restarts, and last the tree unit is stopped (the teardown). This file
asserts on what the check wrote.

The host's systemd is 252: before 254 (DelegateSubgroup=) a delegated unit
whose own cgroup has controllers enabled for children cannot be restarted
(EBUSY attaching the new main process). That the tree lives in
agentcg-tree.service, not in agentcgd.service, is what these tests check.

Needs a pure cgroup v2 tree with controllers and root: CI runs it in the
kernel lab (marked kernlab), where PID 1 is not systemd.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2_controllers

pytestmark = pytest.mark.kernlab

REPO = Path(__file__).resolve().parents[2]
CONTROLLERS = ("cpu", "memory", "pids", "io")
BOOT_TIMEOUT_S = 480


def _check_unit(out: Path, log: Path) -> str:
    return "\n".join([
        "[Unit]",
        "Description=agentcg checks of agentcgd.service under systemd PID 1",
        "SuccessAction=exit",
        "FailureAction=exit",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={sys.executable} {REPO}/tests/kernel/pid1_checks.py {REPO} {out}",
        "WorkingDirectory=/",
        "Environment=PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "TimeoutStartSec=infinity",
        f"StandardOutput=append:{log}",
        "StandardError=inherit",
    ]) + "\n"


def _enable_controllers(mnt: Path) -> None:
    """The container's systemd can only delegate what the root passes down."""
    have = set((mnt / "cgroup.controllers").read_text().split())
    (mnt / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS if c in have))


@pytest.fixture(scope="module")
def pid1(tmp_path_factory) -> dict:
    mnt = require_cgroup2_controllers(*CONTROLLERS)
    if not shutil.which("systemd-nspawn"):
        pytest.fail("systemd-nspawn is not installed (Debian: systemd-container; scripts/setup.sh)")
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this host runs systemd as PID 1: boot the unit there instead of in a container")
    _enable_controllers(mnt)
    work = tmp_path_factory.mktemp("pid1")
    out, log = work / "pid1.json", work / "check.log"
    unit = work / "agentcg-pid1-check.service"
    unit.write_text(_check_unit(out, log))
    prefix = Path(sys.base_prefix).resolve()
    cmd = ["systemd-nspawn", "--boot", "--directory=/", "--volatile=yes", "--register=no", "--keep-unit",
           "--console=pipe", "--quiet", f"--bind={REPO}", f"--bind={work}",
           f"--bind-ro={unit}:/etc/systemd/system/{unit.name}", "systemd.unit=" + unit.name]
    if not str(prefix).startswith("/usr"):
        cmd.insert(-1, f"--bind-ro={prefix}")
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S)
    if not out.exists():
        log_text = log.read_text() if log.exists() else ""
        pytest.fail(f"the check wrote nothing (nspawn rc={r.returncode}):\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-3000:]}\n{log_text[-3000:]}")
    obs = json.loads(out.read_text())
    obs["nspawn_rc"] = r.returncode
    assert "error" not in obs, json.dumps(obs, indent=1)[-6000:]
    return obs


def test_container_boots_with_systemd_as_pid1(pid1):
    assert pid1["boot"]["pid1"] == "systemd"
    assert pid1["nspawn_rc"] == 0     # the check unit succeeded (FailureAction=exit passes its status)


def test_start_returns_after_ready(pid1):
    s = pid1["start"]
    assert s["rc"] == 0, s["stderr"]
    assert s["show"]["ActiveState"] == "active" and s["show"]["SubState"] == "running"
    assert s["show"]["StatusText"].startswith("serving on /run/agentcg/agentcg.sock")
    # READY=1 is sent once the socket serves: the first request right after start answers
    assert s["served_at_once"] and s["status_daemon"]["pid"] == int(s["show"]["MainPID"])


def test_delegate_gives_the_tree_unit_its_subtree(pid1):
    d = pid1["delegate"]
    unit, tree = d["control_group"], d["tree"]["ControlGroup"]
    assert unit.endswith("/agentcgd.service") and tree.endswith("/agentcg-tree.service")
    assert d["tree"]["ActiveState"] == "active"
    # the daemon alone in its own unit's cgroup: systemd can place a new one there
    assert d["daemon_cgroup"] == unit and d["unit_children"] == []
    # the holder moved into a leaf, controllers enabled for the sessions beside it
    assert d["holder_procs"] == [d["tree"]["MainPID"]]
    assert {"cpu", "memory", "pids"} <= set(d["tree_subtree_control"])
    assert {"holder", "s-pid1"} <= set(d["tree_children"])
    assert d["call_cgroup"] == f"{tree}/s-pid1/c-1" and "c-1" in d["session_children"]
    assert d["status_root"] == f"/sys/fs/cgroup{tree}"


def test_restart_keeps_the_session_and_accounts_the_running_call(pid1):
    r = pid1["restart"]
    assert r["rc"] == 0, r["stderr"]
    assert r["show"]["ActiveState"] == "active" and int(r["show"]["MainPID"]) != r["old_pid"]
    assert r["call_alive_after_restart"]
    assert r["tree_after"]["ActiveState"] == "active"
    assert r["tree_after"]["MainPID"] == pid1["delegate"]["tree"]["MainPID"]   # the tree unit was left alone
    assert "pid1" in r["sessions_after_restart"]
    assert r["exit_status"] == 3 and r["wall_ns"] > 0 and r["cpu_usage_usec"] is not None
    # numbers go on increasing (a spare cgroup made ahead may have taken the next one)
    assert r["next_call"] > r["call_number"]


def test_watchdog_restarts_a_hung_daemon(pid1):
    w = pid1["watchdog"]
    assert w["restarted"], w["journal_tail"]
    assert int(w["after"]["NRestarts"]) == int(w["before"]["NRestarts"]) + 1
    assert int(w["after"]["MainPID"]) != w["hung_pid"] and w["hung_pid_gone"]
    assert "atchdog" in w["journal_tail"]
    assert w["session_kept"]
    assert w["tree_after"]["MainPID"] == pid1["delegate"]["tree"]["MainPID"]


def test_clean_stop_leaves_the_tree_and_a_start_accounts_the_call(pid1):
    s = pid1["stop"]
    assert s["rc"] == 0 and s["show"]["ActiveState"] == "inactive"
    assert s["tree"]["ActiveState"] == "active" and s["call_alive"] and s["call_cgroup_kept"]
    assert s["start_rc"] == 0 and s["start_show"]["ActiveState"] == "active", s.get("journal_tail")
    assert s["exit_status"] == 4 and s["wall_ns"] > 0


def test_stopping_the_tree_unit_is_the_teardown(pid1):
    t = pid1["teardown"]
    assert t["rc"] == 0
    assert t["tree"]["ActiveState"] == "inactive" and t["daemon"]["ActiveState"] == "inactive"   # BindsTo=
    assert t["sleeper_returncode"] is not None and t["sleeper_returncode"] < 0   # killed by a signal
    assert t["tree_cgroup_gone"]
