"""The daemon's runtime directory on disk: another uid reaches the socket,
and nothing else. The socket filters sessions and events by uid; the state
file, its journal and the event log hold every uid's sessions, so they must
not be readable around it."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
from pathlib import Path

import pytest

from conftest import daemon_dirs, require_cgroup2, remove_daemon_tree
from agentcg.client import Client
from test_daemon_host import Agentcgd

pytestmark = pytest.mark.kernel
NOBODY = 65534
PRIVATE_FILES = ("state.json", "state.json.journal", "events.jsonl")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _in_child_as(uid: int, fn) -> int:
    """fn() in a forked child whose real, effective and saved uid/gid are uid; its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            code = fn()
        except BaseException as exc:  # report, never return into pytest
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _start(root: Path, runtime: Path, umask: int) -> Agentcgd:
    """A daemon started under `umask` (the modes must not depend on it)."""
    old = os.umask(umask)
    try:
        return Agentcgd(root, runtime).start()
    finally:
        os.umask(old)


def _nobody_reads_nothing_but_the_socket(runtime: Path) -> int:
    """In the child: every private file and the listing refused, the socket served."""
    for name in PRIVATE_FILES:
        try:
            open(runtime / name).close()
            return 10 + PRIVATE_FILES.index(name)
        except PermissionError:
            pass
    try:
        os.listdir(runtime)
        return 20
    except PermissionError:
        pass
    with Client(str(runtime / "agentcg.sock")) as c:
        if c.status()["sessions"] != 0:      # root's session is not nobody's
            return 21
        with c.session("nobodys"):
            if [x["name"] for x in c.sessions()] != ["nobodys"]:
                return 22
    return 0


def _check_modes(runtime: Path) -> None:
    assert _mode(runtime) == 0o711, oct(_mode(runtime))
    assert runtime.stat().st_uid == 0
    for name in PRIVATE_FILES:
        st = (runtime / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0), (name, oct(st.st_mode))


def test_other_uids_reach_the_socket_but_not_the_state_or_events(request):
    root, runtime = daemon_dirs(request, require_cgroup2())
    os.chmod(runtime, 0o777)   # made by someone careless: the daemon tightens it
    d = _start(root, runtime, umask=0)
    try:
        c = Client(d.socket)
        s = c.session("roots", uid=0)
        assert s.run(["true"]).exit_status == 0   # a call: the journal gets its lines
        _check_modes(runtime)
        assert _in_child_as(NOBODY, lambda: _nobody_reads_nothing_but_the_socket(runtime)) == 0
        # left readable by an older version: put right at the next start
        d.stop(signal.SIGKILL)
        for name in PRIVATE_FILES:
            os.chmod(runtime / name, 0o644)
        os.chmod(runtime, 0o755)
        d = _start(root, runtime, umask=0)
        _check_modes(runtime)
        assert [x["name"] for x in Client(d.socket).sessions()] == ["roots"]
        assert _in_child_as(NOBODY, lambda: _nobody_reads_nothing_but_the_socket(runtime)) == 0
    finally:
        d.stop(signal.SIGKILL)
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
