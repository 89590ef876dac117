"""Checks of systemd/agentcgd.service and systemd/agentcg-tree.service run
INSIDE a container booted with systemd as PID 1 (started by
test_systemd_pid1_kernlab.py through systemd-nspawn --boot). Installs the real
units with a drop-in naming this checkout's agentcgd, drives them with
systemctl and the real client, and writes
what it saw to a JSON file (rewritten after every step, so a hang still
leaves the steps before it); the outer test asserts on that file.

    python tests/kernel/pid1_checks.py REPO OUT.json
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

UNIT_DIR = Path("/etc/systemd/system")
# Shorter than the unit's 30 s so that the hung-daemon check takes seconds; the
# mechanism (WATCHDOG=1 pings at half the interval, a restart when they stop)
# is the unit's own.
WATCHDOG_S = 10


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def show(unit: str = "agentcgd") -> dict[str, str]:
    r = sh("systemctl", "show", unit, "-p",
           "ActiveState,SubState,StatusText,MainPID,NRestarts,ControlGroup,Result")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def journal(lines: int = 60) -> str:
    """The last lines of the whole journal: systemd's forked child logs a failure
    to enter the unit's cgroup from outside it, where `-u agentcgd` misses it."""
    return sh("journalctl", "--no-pager", "-o", "cat", "-n", str(lines)).stdout[-6000:]


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def cgroup_dir(rel: str) -> Path:
    return Path("/sys/fs/cgroup") / rel.lstrip("/")


def children(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def install_unit(repo: Path) -> str:
    """The units as shipped, plus a drop-in for agentcgd: this checkout's
    console script, and its interpreter kept visible where ProtectHome= would
    hide it."""
    for name in ("agentcgd.service", "agentcg-tree.service"):
        shutil.copy(repo / "systemd" / name, UNIT_DIR / name)
    exe = repo / ".venv" / "bin" / "agentcgd"
    lines = ["[Service]", "ExecStart=", f"ExecStart={exe}", f"WatchdogSec={WATCHDOG_S}s",
             "Environment=PYTHONDONTWRITEBYTECODE=1"]
    prefix = Path(sys.base_prefix).resolve()
    # ProtectHome= hides /root and /home, PrivateTmp= /tmp and /var/tmp: a
    # checkout or interpreter there is bound back in, read-only
    in_home = [p for p in (prefix, repo) if p.parts[1:2] in (("root",), ("home",))]
    in_tmp = [p for p in (prefix, repo) if p.parts[1:2] == ("tmp",) or p.parts[1:3] == ("var", "tmp")]
    if in_home:
        lines.append("ProtectHome=tmpfs")
    if in_home or in_tmp:
        lines.append("BindReadOnlyPaths=" + " ".join(str(p) for p in in_home + in_tmp))
    drop_in = UNIT_DIR / "agentcgd.service.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (drop_in / "local.conf").write_text(text)
    sh("systemctl", "daemon-reload")
    return text


def wait_for(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


class Steps:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.obs: dict[str, Any] = {"done": []}

    def record(self, step: str, **fields: Any) -> None:
        self.obs[step] = fields
        self.obs["done"].append(step)
        self.out.write_text(json.dumps(self.obs, indent=2) + "\n")


def run(repo: Path, steps: Steps) -> None:
    from agentcg.client import Client

    t0 = time.monotonic()
    steps.record("boot", pid1=Path("/proc/1/comm").read_text().strip(),
                 systemd_version=int(sh("systemctl", "--version").stdout.split()[1]),
                 system_state=sh("systemctl", "is-system-running").stdout.strip(),
                 drop_in=install_unit(repo))

    # Type=notify: start returns once READY=1 came, so the socket answers at once
    t = time.monotonic()
    r = sh("systemctl", "start", "agentcgd")
    start_s = time.monotonic() - t
    state = show()
    client = Client("/run/agentcg/agentcg.sock")
    try:
        status = client.status()
        served = True
    except Exception as exc:   # recorded, asserted outside
        status, served = {"error": repr(exc)}, False
    steps.record("start", rc=r.returncode, stderr=r.stderr, seconds=round(start_s, 2), show=state,
                 served_at_once=served, status_daemon=status.get("daemon"))

    # Delegate=yes on the tree unit: the tree in agentcg-tree.service, the daemon alone in its own unit
    pid = int(state["MainPID"])
    session = client.session("pid1")
    gate = repo / ".pid1-gate"
    gate.unlink(missing_ok=True)
    call = session.tool_call("gated").popen(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.2; done; exit 3"])
    tree = show("agentcg-tree")
    tree_cg = cgroup_dir(tree["ControlGroup"])
    steps.record("delegate", control_group=state["ControlGroup"], daemon_cgroup=cgroup_of(pid),
                 tree=tree, call_cgroup=cgroup_of(call.pid), call_reply_cgroup=call.cgroup,
                 unit_children=children(cgroup_dir(state["ControlGroup"])), tree_children=children(tree_cg),
                 holder_procs=(tree_cg / "holder" / "cgroup.procs").read_text().split(),
                 tree_subtree_control=(tree_cg / "cgroup.subtree_control").read_text().split(),
                 session_children=children(tree_cg / "s-pid1"), status_root=client.status()["daemon"]["cgroup_root"])

    # restart: the session and the running call stay, and the call is accounted
    r = sh("systemctl", "restart", "agentcgd")
    after = show()
    alive = call.proc.poll() is None
    restart: dict[str, Any] = dict(rc=r.returncode, stderr=r.stderr, show=after, old_pid=pid,
                                   call_alive_after_restart=alive, call_number=call.number,
                                   tree_after=show("agentcg-tree"))
    if after.get("ActiveState") == "active":
        restart["sessions_after_restart"] = [s["name"] for s in client.sessions()]
        gate.touch()
        result = call.wait()
        restart.update(exit_status=result.exit_status, wall_ns=result.stats.get("wall_ns"),
                       cpu_usage_usec=result.stats.get("cpu_usage_usec"), next_call=session.run(["true"]).call)
    else:   # let the call finish so that the container can shut down
        gate.touch()
        call.proc.wait(60)
        restart["journal_tail"] = journal()
    gate.unlink(missing_ok=True)
    steps.record("restart", **restart)
    if after.get("ActiveState") != "active":
        return

    # watchdog: a stopped daemon sends no WATCHDOG=1; systemd aborts and restarts it
    before = show()
    hung = int(before["MainPID"])
    t = time.monotonic()
    os.kill(hung, signal.SIGSTOP)

    def restarted() -> bool:
        s = show()
        return s.get("MainPID") not in ("0", str(hung)) and s.get("ActiveState") == "active"

    ok = wait_for(restarted, WATCHDOG_S * 6)
    wd = show()
    served = False
    try:
        served = any(x["name"] == "pid1" for x in client.sessions())
    except Exception:
        pass
    steps.record("watchdog", restarted=ok, seconds=round(time.monotonic() - t, 1), before=before, after=wd,
                 hung_pid=hung, hung_pid_gone=not Path(f"/proc/{hung}").exists(), session_kept=served,
                 tree_after=show("agentcg-tree"), journal_tail=journal())

    # clean stop and start: the tree unit and a running call stay, the call is accounted after the start
    call = session.tool_call("across-stop").popen(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.2; done; exit 4"])
    r = sh("systemctl", "stop", "agentcgd")
    stopped = show()
    stop: dict[str, Any] = dict(rc=r.returncode, show=stopped, tree=show("agentcg-tree"),
                                call_alive=call.proc.poll() is None,
                                call_cgroup_kept=(tree_cg / "s-pid1" / f"c-{call.number}").is_dir())
    r = sh("systemctl", "start", "agentcgd")
    stop.update(start_rc=r.returncode, start_show=show())
    gate.touch()
    if stop["start_show"].get("ActiveState") == "active":
        result = call.wait()
        stop.update(exit_status=result.exit_status, wall_ns=result.stats.get("wall_ns"))
    else:
        call.proc.wait(60)
        stop["journal_tail"] = journal()
    gate.unlink(missing_ok=True)
    steps.record("stop", **stop)

    # teardown: stopping the tree unit stops the daemon (BindsTo=) and kills what the tree holds
    sleeper = session.tool_call("sleeper").popen(["sleep", "600"])
    r = sh("systemctl", "stop", "agentcg-tree")
    try:
        code = sleeper.proc.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    steps.record("teardown", rc=r.returncode, tree=show("agentcg-tree"), daemon=show(), sleeper_returncode=code,
                 tree_cgroup_gone=not tree_cg.exists(), total_s=round(time.monotonic() - t0, 1))


def main() -> int:
    repo, out = Path(sys.argv[1]), Path(sys.argv[2])
    steps = Steps(out)
    try:
        run(repo, steps)
    except BaseException as exc:
        steps.obs["error"] = repr(exc)
        steps.obs["journal"] = sh("journalctl", "--no-pager", "-o", "short-monotonic", "-n", "80").stdout
        out.write_text(json.dumps(steps.obs, indent=2) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
