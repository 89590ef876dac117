"""clone_into on this host's cgroup2 (no controllers needed): the child is
born in its call cgroup, exit statuses pass through, a program that cannot
be executed gives 127 and says why, and an unprivileged caller (whom the
kernel refuses CLONE_INTO_CGROUP) falls back to the waiting child."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import require_cgroup2
from agentcg.adapters.cgroupfs import detect_hierarchy
from agentcg.client import Client
from test_daemon_host import _as_nobody, gone_soon, start_daemon

pytestmark = pytest.mark.kernel


@pytest.fixture
def daemon(request):
    yield from start_daemon(request, require_cgroup2())


def _cgroup_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.startswith("0::")][0][3:]


def test_clone_into_child_runs_its_first_instruction_in_the_call_cgroup(daemon, tmp_path):
    mount = detect_hierarchy().cgroup2_mount
    c = Client(daemon.socket, clone_into=True)
    with c.session("clone") as s:
        out = tmp_path / "cgroup.txt"
        with open(out, "w") as f:
            call = s.tool_call("cat")
            h = call.popen(["cat", "/proc/self/cgroup"], stdout=f)
            r = h.wait()
        assert h.placement == "clone_into"
        assert h.started and h.started[0]["ok"] and h.started[0]["placement"] == "clone_into"
        # cat read its own cgroup: it was born there, never migrated
        assert mount + _cgroup_line(out.read_text()) == str(daemon.root / "s-clone" / f"c-{r.call}")
        assert r.exit_status == 0 and r.error is None and r.stats["wall_ns"] > 0
        assert gone_soon(daemon.root / "s-clone" / f"c-{r.call}")
        assert s.run(["sh", "-c", "exit 7"]).exit_status == 7
        assert s.run(["sh", "-c", "kill -KILL $$"]).exit_status == 137
        nxt = s.tool_call("sleep").popen(["sleep", "0.2"])
        assert nxt.placement == "clone_into" and nxt.wait().exit_status == 0
    events = [e for e in c.events() if e.get("session") == "clone" and e["type"] in ("call.start", "call.end")]
    assert [e["type"] for e in events] == ["call.start", "call.end"] * 4
    starts = [e for e in events if e["type"] == "call.start"]
    assert all(e["placement"] == "clone_into" and e["pid"] > 0 for e in starts)


def test_clone_into_missing_program_exits_127_with_a_clear_error(daemon, tmp_path):
    c = Client(daemon.socket, clone_into=True)
    with c.session("missing") as s:
        err = tmp_path / "stderr.txt"
        with open(err, "w") as f:
            r = s.tool_call("nope").run(["/nonexistent/agentcg-prog", "x"], stderr=f)
        assert r.exit_status == 127
        assert r.error == "cannot execute /nonexistent/agentcg-prog: No such file or directory"
        assert "agentcg: cannot execute /nonexistent/agentcg-prog" in err.read_text()
        assert gone_soon(daemon.root / "s-missing" / f"c-{r.call}")
        # a name not on PATH is refused before any call starts
        with pytest.raises(FileNotFoundError):
            s.tool_call("nope").popen(["agentcg-no-such-program"])
        assert s.show()["running_calls"] == 0


@pytest.fixture
def shared_dir():
    """A directory uid 65534 can write (pytest's tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix="agentcg-clone-"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_caller_falls_back_to_the_waiting_child(daemon, shared_dir):
    mount = detect_hierarchy().cgroup2_mount
    tmp_path = shared_dir
    report = tmp_path / "report.json"

    def as_nobody() -> int:
        # a forked copy of pytest: free the low fds, so that the waiting child is
        # /bin/sh (this interpreter under /root is not executable for uid 65534)
        os.closerange(3, 4096)
        out = tmp_path / "cgroup.txt"
        c = Client(daemon.socket, clone_into=True)
        with c.session("nobody") as s:
            with open(out, "w") as f:
                h1 = s.tool_call("cat").popen(["cat", "/proc/self/cgroup"], stdout=f)
                r1 = h1.wait()
            first = _cgroup_line(out.read_text())
            h2 = s.tool_call("exit").popen(["sh", "-c", "exit 5"])
            r2 = h2.wait()
            report.write_text(json.dumps({
                "placement": [h1.placement, h2.placement], "clone_into": c.clone_into,
                "status": [r1.exit_status, r2.exit_status], "cgroup": first, "call": r1.call,
                "default": Client(daemon.socket).clone_into}))
        return 0

    assert _as_nobody(as_nobody) == 0
    rep = json.loads(report.read_text())
    # the kernel refused clone3 into root's tree: the client remembered and placed by pid
    assert rep["clone_into"] is False and rep["default"] is False
    assert rep["placement"] == ["pid", "pid"]
    assert rep["status"] == [0, 5]
    assert mount + rep["cgroup"] == str(daemon.root / "s-nobody" / f"c-{rep['call']}")


def test_without_the_helper_or_posix_spawn_the_daemon_places_the_child(daemon, tmp_path, monkeypatch, caplog):
    """No spawn helper built and no posix_spawn cgroup attribute: the client
    never makes a child itself, it asks for the pid placement of a waiting
    child, says so in a debug log, and keeps clone_into for later."""
    from agentcg.client import _clone
    monkeypatch.setattr(_clone, "HELPER_PATH", tmp_path / "absent" / "_spawn.so")
    monkeypatch.setattr(_clone, "_helper", None)
    monkeypatch.setattr(_clone, "_method_logged", False)
    monkeypatch.setattr(_clone, "USE_POSIX_SPAWN", False)
    caplog.set_level("DEBUG", logger="agentcg.client")
    mount = detect_hierarchy().cgroup2_mount
    c = Client(daemon.socket, clone_into=True)
    with c.session("nohelper") as s:
        out = tmp_path / "cgroup.txt"
        with open(out, "w") as f:
            h = s.tool_call("cat").popen(["cat", "/proc/self/cgroup"], stdout=f)
            r = h.wait()
        assert h.placement == "pid" and r.exit_status == 0
        assert mount + _cgroup_line(out.read_text()) == str(daemon.root / "s-nohelper" / f"c-{r.call}")
        assert s.run(["sh", "-c", "exit 6"]).exit_status == 6
    assert c.clone_into is True
    assert "the daemon's pid placement (no posix_spawn with SETCGROUP, no spawn helper)" in caplog.text


def test_call_that_ran_while_the_daemon_was_down_is_accounted_not_taken_for_a_spare(daemon):
    c = Client(daemon.socket, clone_into=True)
    s = c.session("down")
    h = s.tool_call("exit").popen(["sh", "-c", "exit 4"])
    daemon.stop(signal.SIGKILL)                 # right after call.start's reply
    assert h.proc.wait_exited(10)               # the tool ends while no daemon runs
    daemon.start()
    r = h.wait()
    assert r.exit_status == 4 and r.call == h.number
    log = [json.loads(x) for x in (daemon.runtime / "events.jsonl").read_text().splitlines()]
    ends = [e for e in log if e["type"] == "call.end" and e["session"] == "down"]
    assert [e["call"] for e in ends] == [h.number]
    # the spare made ahead before the crash is gone, not adopted as a call
    assert s.show()["running_calls"] == 0
    assert s.run(["true"]).call == h.number + 1
    s.end()
    assert not (daemon.root / "s-down").exists()


def _spawn_paths():
    from agentcg.client import _clone
    no_helper = [] if _clone.helper() else [pytest.mark.skip(reason="spawn helper not built (scripts/setup.sh)")]
    no_vfork = [] if _clone.helper() and _clone.helper().agentcg_spawn_can_share_memory() else \
        [pytest.mark.skip(reason="the helper shares memory with its child on x86-64 only")]
    no_posix = [] if _clone.posix_spawn_lib() else \
        [pytest.mark.skip(reason="this C library has no posix_spawnattr_setcgroup_np (glibc < 2.39)")]
    return [pytest.param("helper-vfork", id="helper-vfork", marks=no_helper + no_vfork),
            pytest.param("helper-fork", id="helper-fork", marks=no_helper),
            pytest.param("posix_spawn", id="posix_spawn", marks=no_posix)]


@pytest.mark.parametrize("how", _spawn_paths())
def test_spawn_paths_agree_on_cgroup_fds_cwd_and_signals(how, tmp_path, monkeypatch):
    """Both ways of starting a command in its cgroup give the same child:
    born in the cgroup, stdio and pass_fds inherited, every other descriptor
    closed, the cwd set, SIGPIPE and SIGXFSZ back to their defaults."""
    from agentcg.client import _clone
    monkeypatch.setattr(_clone, "USE_POSIX_SPAWN", how == "posix_spawn")
    monkeypatch.setattr(_clone, "HELPER_SHARE_MEMORY", how == "helper-vfork")
    monkeypatch.setenv("AGENTCG_SPAWN_T", "x=é")     # the caller's environment, as it is now
    mount = Path(require_cgroup2())
    cg = mount / f"agentcg-spawn-{os.getpid()}"
    cg.mkdir()
    keep_r, keep_w = os.pipe()
    stray = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(stray, True)           # inheritable, still not passed on
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    out = tmp_path / "out.txt"
    try:
        script = 'cat /proc/self/cgroup; echo "adj $(cat /proc/$$/oom_score_adj)"; echo fds; ls /proc/$$/fd; echo end; pwd; grep SigIgn /proc/$$/status; echo "env $AGENTCG_SPAWN_T"; exit 3'
        with open(out, "w") as f:
            prep = _clone.Prepared(["sh", "-c", script], stdout=f, cwd=str(tmp_path), pass_fds=[keep_w])
            try:
                proc = _clone.spawn(prep, cg_fd, 500)
            finally:
                prep.close()
        assert proc.how == how
        assert proc.wait_exited(10) and proc.wait(10) == 3
        lines = out.read_text().splitlines()
        assert mount.as_posix() + [ln for ln in lines if ln.startswith("0::")][0][3:] == str(cg)
        fds = lines[lines.index("fds") + 1:lines.index("end")]
        assert sorted(fds, key=int) == ["0", "1", "2", str(keep_w)]
        assert str(tmp_path) in lines and "env x=é" in lines and "adj 500" in lines
        ignored = int([ln for ln in lines if ln.startswith("SigIgn:")][0].split()[1], 16)
        assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
        # a program that cannot be executed: exit 127 and its errno, whichever path
        prep = _clone.Prepared(["/nonexistent/agentcg-prog"])
        try:
            bad = _clone.spawn(prep, cg_fd)
        finally:
            prep.close()
        assert bad.wait(10) == 127 and bad.exec_errno == 2
    finally:
        for fd in (keep_r, keep_w, stray, cg_fd):
            os.close(fd)
        cg.rmdir()


def _contend_for_the_interpreter_lock(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


@pytest.mark.slow
def test_children_exec_while_other_threads_contend_for_the_interpreter_lock(scratch):
    """A multi-threaded caller: eight threads in pure-Python loops ask for the
    interpreter lock every switch interval while the main thread starts
    children in a cgroup. Every child must exec and exit with its own status
    (a child that ran the interpreter between the clone and the exec could
    wait forever for a lock held by a thread it does not have). A child stuck
    before its exec also holds up spawn() (it waits for the exec): a watchdog
    kills the cgroup's processes when no child got through for 60 s."""
    from agentcg.client import _clone
    if _clone.method() is None:
        pytest.skip("no safe way to spawn into a cgroup here (no helper built, glibc < 2.39)")
    stop = threading.Event()
    threads = [threading.Thread(target=_contend_for_the_interpreter_lock, args=(stop,), daemon=True)
               for _ in range(8)]
    progress = [0]

    def watchdog() -> None:
        seen = -1
        while not stop.wait(60):
            if progress[0] == seen:
                # not cgroup.kill: after one, Linux 6.18 kills every later child born in the cgroup
                for pid in (scratch / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            seen = progress[0]
    threads.append(threading.Thread(target=watchdog, daemon=True))
    ballast = [bytes(4096) for _ in range(20_000)]   # 80 MB more to copy: a slower fork-style clone
    cg_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    started: list = []
    try:
        for t in threads:
            t.start()
        for i in range(200):
            prep = _clone.Prepared(["/bin/sh", "-c", f"exit {i % 100}"], stdout=subprocess.DEVNULL)
            try:
                proc = _clone.spawn(prep, cg_fd)
            finally:
                prep.close()
            assert proc is not None
            started.append(proc)
            assert proc.wait(timeout=20) == i % 100, f"child {i} ({proc.how}) did not exec"
            progress[0] += 1
    finally:
        stop.set()
        for proc in started:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join()
        os.close(cg_fd)
    del ballast
