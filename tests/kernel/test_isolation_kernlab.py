"""Isolation between real uids on real cgroup v2 (kernel lab, cgroup2
mounted with nsdelegate): two unprivileged uids, each running the client in
forked children with setresuid, against one daemon started under umask 0.

uid A (65534) owns session "a" and runs a tool call in it; the tool itself
tries to change its limits and leave its call cgroup. uid B (65533) then
tries everything on A's session, and to place processes that are not its
own. Each side reports what happened as JSON over a pipe; the test asserts
in the parent."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2_controllers
from test_daemon_host import Agentcgd
from agentcg.client import Client, ProtocolError

pytestmark = pytest.mark.kernlab
UID_A, UID_B = 65534, 65533
GRANTS = f"""
[grants.default]
max_priority = 5
memory_max = "256M"
pids_max = 64

[grants.{UID_B}]
max_priority = 7
memory_max = "512M"
"""
CLONE_NEWUSER, CLONE_NEWCGROUP = 0x10000000, 0x02000000


def outcome(fn: Callable[[], Any]) -> str:
    """'ok', the protocol error code, or the errno name of what fn() raised."""
    try:
        fn()
        return "ok"
    except ProtocolError as exc:
        return exc.code
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def write(path: Path, text: str) -> Callable[[], None]:
    return lambda: path.write_text(text)


def forked(uid: int, fn: Callable[..., Any], *args: Any) -> tuple[int, Any, int]:
    """Run fn(report, *args) in a child with real, effective and saved uid
    and gid `uid`; report(obj) sends one JSON line back. Returns (pid, a
    reader of the reports, the write end of a pipe the child may wait on)."""
    out_r, out_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(out_r), os.close(go_w)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

            def report(obj: Any) -> None:
                os.write(out_w, (json.dumps(obj) + "\n").encode())
            fn(report, go_r, *args)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(out_w), os.close(go_r)
    return pid, os.fdopen(out_r), go_w


def _read_report(reader) -> Any:
    line = reader.readline()
    assert line, "the child died before it reported (see its traceback on stderr)"
    return json.loads(line)


def _own_cgroup(mount: str) -> Path:
    return Path(mount + Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip())


def tool_tries_to_escape(mount: str, session_dir: Path, daemon_root: Path) -> dict[str, str]:
    """Run by the tool inside its own call cgroup, as uid A."""
    me = str(os.getpid())
    cg = _own_cgroup(mount)
    tries = {
        "own memory.max": write(cg / "memory.max", "max"),
        "own memory.high": write(cg / "memory.high", "max"),
        "own pids.max": write(cg / "pids.max", "max"),
        "own cpu.weight": write(cg / "cpu.weight", "10000"),
        "own subtree_control": write(cg / "cgroup.subtree_control", "+memory"),
        "mkdir in own call": lambda: os.mkdir(cg / "escape"),
        "session memory.max": write(session_dir / "memory.max", "max"),
        "into agent cgroup": write(session_dir / "agent" / "cgroup.procs", me),
        "into session cgroup": write(session_dir / "cgroup.procs", me),
        "into daemon root": write(daemon_root / "cgroup.procs", me),
        "into daemon leaf": write(daemon_root / "daemon" / "cgroup.procs", me),
        "into mount root": write(Path(mount) / "cgroup.procs", me),
    }
    seen = {name: outcome(fn) for name, fn in tries.items()}
    seen["still in"] = str(cg) if _own_cgroup(mount) == cg else "moved"
    # root in a user namespace of its own (and a cgroup namespace, the
    # delegation boundary under nsdelegate) is still nobody to the tree's files
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWCGROUP) == 0:
        seen["userns: own memory.max"] = outcome(write(cg / "memory.max", "max"))
        seen["userns: into mount root"] = outcome(write(Path(mount) / "cgroup.procs", me))
    else:
        seen["userns"] = errno.errorcode.get(ctypes.get_errno(), "?")
    return seen


def side_a(report, go_r: int, sock: str, mount: str, root: Path, half_root_pid: int) -> None:
    c = Client(sock)
    seen = {
        "priority 9": outcome(lambda: c.session("x", intent={"priority": 9})),
        "memory_max 1G": outcome(lambda: c.session("x", intent={"memory_max": "1G"})),
        "pids_max 1000": outcome(lambda: c.session("x", intent={"pids_max": 1000})),
    }
    c.session("a", intent={"memory_max": "128M", "priority": 5}, end_on_exit=False)
    # the tool: a forked child held on a pipe until the daemon placed it
    hold_r, hold_w = os.pipe()
    res_r, res_w = os.pipe()
    tool = os.fork()
    if tool == 0:
        os.read(hold_r, 1)
        os.write(res_w, (json.dumps(tool_tries_to_escape(mount, root / "s-a", root)) + "\n").encode())
        os.read(hold_r, 1)
        os._exit(0)
    call = c.request("call.start", session="a", pid=tool, name="probe")["call"]
    os.write(hold_w, b"x")
    seen["tool"] = json.loads(os.fdopen(res_r).readline())
    # a process with A's real and effective uid whose saved uid is root's
    seen["attach half-root"] = outcome(lambda: c.request("session.attach", name="a", pid=half_root_pid))
    report({"seen": seen, "call": call, "tool": tool, "me": os.getpid()})
    os.read(go_r, 1)                 # B has had its turn
    os.write(hold_w, b"x")
    os.waitpid(tool, 0)
    c.request("call.end", session="a", call=call, exit_status=0)
    c.request("session.end", name="a")
    report({"ended": True})


def side_b(report, go_r: int, sock: str, root: Path, a: dict[str, Any], daemon_pid: int) -> None:
    c = Client(sock)
    hold_r, hold_w = os.pipe()
    mine = os.fork()                 # a waiting child of B's own
    if mine == 0:
        os.read(hold_r, 1)
        os._exit(0)
    n = a["call"]
    seen = {
        "show": outcome(lambda: c.request("session.show", name="a")),
        "end": outcome(lambda: c.request("session.end", name="a", force=True)),
        "attach own pid": outcome(lambda: c.request("session.attach", name="a", pid=os.getpid())),
        "call.start own child": outcome(lambda: c.request("call.start", session="a", pid=mine)),
        "call.end": outcome(lambda: c.request("call.end", session="a", call=n)),
        "call.started": outcome(lambda: c.request("call.started", session="a", call=n, pid=mine)),
        "list": [s["name"] for s in c.sessions()],
        "events of a": sum(1 for e in c.events() if e.get("session") == "a"),
        "events --session a": sum(1 for _ in c.events(session="a")),
        "status sessions": c.status()["sessions"],
        "mkdir in a's session": outcome(lambda: os.mkdir(root / "s-a" / "intruder")),
        "a's memory.max": outcome(write(root / "s-a" / "memory.max", "max")),
        "priority 8": outcome(lambda: c.session("y", intent={"priority": 8})),
        "memory_max 1G": outcome(lambda: c.session("y", intent={"memory_max": "1G"})),
    }
    c.session("b", intent={"priority": 7, "memory_max": "512M"}, end_on_exit=False)
    for who, pid in (("daemon", daemon_pid), ("pid 1", 1), ("a's tool", a["tool"]), ("a's client", a["me"])):
        seen[f"attach {who}"] = outcome(lambda: c.request("session.attach", name="b", pid=pid))
        seen[f"call.start {who}"] = outcome(lambda: c.request("call.start", session="b", pid=pid))
    c.request("session.end", name="b")
    os.write(hold_w, b"x")
    os.waitpid(mine, 0)
    report(seen)


def tree_modes(root: Path) -> list[str]:
    """Every directory and file of the tree the daemon made that is not
    root's or that a group or others may write."""
    bad = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if st.st_uid != 0 or st.st_gid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            bad.append(f"{path.relative_to(root.parent)} {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}")
    return bad


def test_uids_cannot_reach_each_others_sessions_limits_or_the_tree(request, tmp_path):
    mnt = require_cgroup2_controllers("memory", "pids", "cpu")
    opts = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[2] == "cgroup2")
    root, runtime = daemon_dirs(request, mnt)
    cfg = tmp_path / "agentcg.toml"
    cfg.write_text(GRANTS)
    old = os.umask(0)      # the tree's modes must not depend on the daemon's umask
    try:
        d = Agentcgd(root, runtime, ["--config", str(cfg)], require_controllers=True).start()
    finally:
        os.umask(old)
    children: list[int] = []
    half_root = os.fork()
    if half_root == 0:
        os.setresuid(UID_A, UID_A, 0)
        signal.pause()
        os._exit(0)
    children.append(half_root)
    try:
        daemon_pid = Client(d.socket).status()["daemon"]["pid"]
        pid_a, from_a, go_a = forked(UID_A, side_a, d.socket, str(mnt), root, half_root)
        children.append(pid_a)
        a = _read_report(from_a)
        bad_modes = tree_modes(root)
        limits = {f: (root / "s-a" / f).read_text().strip() for f in ("memory.max", "pids.max")}
        pid_b, from_b, _ = forked(UID_B, side_b, d.socket, root, a, daemon_pid)
        children.append(pid_b)
        b = _read_report(from_b)
        os.write(go_a, b"x")
        assert _read_report(from_a) == {"ended": True}

        assert "nsdelegate" in opts.split(",")
        assert bad_modes == []
        assert limits == {"memory.max": str(128 << 20), "pids.max": "64"}   # A's intent, A's grant
        seen = a["seen"]
        assert {k: seen[k] for k in ("priority 9", "memory_max 1G", "pids_max 1000")} == \
            dict.fromkeys(("priority 9", "memory_max 1G", "pids_max 1000"), "over_grant")
        assert seen["attach half-root"] == "bad_pid"
        tool = seen["tool"]
        assert tool.pop("still in") == str(root / "s-a" / f"c-{a['call']}")
        assert [k for k, v in tool.items() if v not in ("EACCES", "EPERM")] == [], tool
        # where the kernel refuses the namespaces (EPERM in a chroot, as in the
        # kernel lab) the writes above are all there is to try
        assert "userns: own memory.max" in tool or tool.pop("userns") == "EPERM"

        assert {k: b[k] for k in ("show", "end", "attach own pid", "call.start own child",
                                  "call.end", "call.started")} == \
            dict.fromkeys(("show", "end", "attach own pid", "call.start own child", "call.end",
                           "call.started"), "forbidden")
        assert b["list"] == [] and b["events of a"] == 0 and b["events --session a"] == 0
        assert b["status sessions"] == 0
        assert b["mkdir in a's session"] in ("EACCES", "EPERM")
        assert b["a's memory.max"] in ("EACCES", "EPERM")
        assert b["priority 8"] == "over_grant" and b["memory_max 1G"] == "over_grant"
        for who in ("daemon", "pid 1", "a's tool", "a's client"):
            assert (b[f"attach {who}"], b[f"call.start {who}"]) == ("bad_pid", "bad_pid"), who
        # what B tried left nothing behind in A's session
        of_a = [e for e in Client(d.socket).events() if e.get("session") == "a"]
        assert [e for e in of_a if e.get("by_uid") == UID_B or e["type"] == "session.attach"] == []
        assert [e["calls_done"] for e in of_a if e["type"] == "session.end"] == [1]
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        d.stop(signal.SIGKILL)
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
