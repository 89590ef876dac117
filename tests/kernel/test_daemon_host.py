"""The real daemon on this host's cgroup2 tree (no controllers needed):
placement before exec, accounting, stragglers, ownership, kill -9 restart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_cgroup2
from daemon_proc import Agentcgd, start_daemon  # noqa: F401  (Agentcgd: imported from here by other tests)
from agentcg.adapters.cgroupfs import detect_hierarchy
from agentcg.client import Client, ProtocolError

pytestmark = pytest.mark.kernel


def gone_soon(path: Path, timeout_s: float = 5.0) -> bool:
    """A call cgroup is removed right after call.end's reply: wait for it."""
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return not path.exists()


@pytest.fixture
def daemon(request):
    yield from start_daemon(request, require_cgroup2())


def test_command_runs_inside_its_call_cgroup_from_its_first_instruction(daemon):
    c = Client(daemon.socket)
    with c.session("place") as s:
        with s.tool_call("cat") as call:
            r = call.run(["cat", "/proc/self/cgroup"], stdout=subprocess.PIPE)
        # cat printed its own cgroup: it was placed before it was exec'd
        line = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("0::")][0]
        mount = detect_hierarchy().cgroup2_mount
        assert mount + line[3:] == str(daemon.root / "s-place" / "c-1")
        assert r.exit_status == 0 and r.call == 1
        assert r.stats["cpu_usage_usec"] > 0 and r.stats["wall_ns"] > 0
        assert gone_soon(daemon.root / "s-place" / "c-1")         # removed at the end
        r2 = s.run(["sh", "-c", "exit 7"])
        assert r2.exit_status == 7 and r2.call == 2
        r3 = s.run(["sh", "-c", "kill -KILL $$"])
        assert r3.exit_status == 137
    assert not (daemon.root / "s-place").exists()
    lifecycle = {"session.create", "call.start", "call.end", "session.end"}
    events = [e["type"] for e in c.events() if e.get("session") == "place" and e["type"] in lifecycle]
    assert events == ["session.create"] + ["call.start", "call.end"] * 3 + ["session.end"]


def test_stragglers_are_killed_and_reported(daemon):
    c = Client(daemon.socket)
    with c.session("strag") as s:
        r = s.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE)
        bg = int(r.stdout.split()[0])
        assert r.stats["stragglers"] == 1 and r.stats["stragglers_action"] == "killed"
        assert [f["kind"] for f in r.feedback] == ["stragglers_killed"]
        for _ in range(100):
            if not Path(f"/proc/{bg}").exists() or "Z" in Path(f"/proc/{bg}/stat").read_text().split()[2]:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"straggler {bg} still runs")


def _as_nobody(fn) -> int:
    """Run fn() in a forked child with uid/gid 65534; its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = fn()
        except BaseException as exc:  # report, never return into pytest
            print("child error:", repr(exc), file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_second_uid_cannot_touch_first_uids_session(daemon):
    c = Client(daemon.socket)
    s = c.session("owned", uid=0)
    running = s.tool_call("sleep").popen(["sleep", "30"])
    try:
        def intruder() -> int:
            other = Client(daemon.socket)
            denied = 0
            for op, fields in [("session.show", {"name": "owned"}),
                               ("session.end", {"name": "owned", "force": True}),
                               ("call.end", {"session": "owned", "call": running.number}),
                               ("call.start", {"session": "owned", "pid": os.getpid()}),
                               ("session.attach", {"name": "owned", "pid": os.getpid()})]:
                try:
                    other.request(op, **fields)
                except ProtocolError as exc:
                    denied += exc.code == "forbidden"
            if other.sessions():                      # nobody sees root's sessions
                return 10
            if any(e.get("session") == "owned" for e in other.events()):
                return 11
            # nobody may not move root's process into nobody's own session
            other.session("mine")
            try:
                other.request("call.start", session="mine", pid=1)
                return 12
            except ProtocolError as exc:
                if exc.code != "bad_pid":
                    return 13
            other.request("session.end", name="mine")
            return 0 if denied == 5 else 20 + denied
        assert _as_nobody(intruder) == 0
        assert running.proc.poll() is None            # root's call still runs
        assert [x["name"] for x in c.sessions()] == ["owned"]
    finally:
        running.kill()
        r = running.wait()
        s.end()
    assert r.exit_status == 137


def test_kill_9_mid_call_then_restart_accounts_the_call(daemon):
    c = Client(daemon.socket)
    s = c.session("crash")
    h = s.tool_call("sleep").popen(["sh", "-c", "sleep 1.5; exit 3"])
    call_dir = daemon.root / "s-crash" / f"c-{h.number}"
    assert call_dir.is_dir()
    daemon.stop(signal.SIGKILL)
    assert h.proc.poll() is None                      # the tool call keeps running
    daemon.start()
    r = h.wait()                                       # reconnects; the new daemon accounts it
    assert r.exit_status == 3
    assert r.stats["wall_ns"] >= 1_400_000_000
    assert r.stats["cpu_usage_usec"] is not None
    assert gone_soon(call_dir)
    log = [json.loads(x) for x in (daemon.runtime / "events.jsonl").read_text().splitlines()]
    ends = [e for e in log if e["type"] == "call.end" and e["session"] == "crash"]
    assert len(ends) == 1 and ends[0]["call"] == h.number
    # the restarted daemon still knows the session and numbers calls on
    assert s.run(["true"]).call == h.number + 1
    s.end()
    assert not (daemon.root / "s-crash").exists()


def test_orphaned_call_is_finalised_when_its_processes_exit(daemon):
    code = subprocess.run([sys.executable, "-c", f"""
import sys
from agentcg.client import Client
c = Client({daemon.socket!r})
s = c.session("orphan")
h = s.tool_call("sleep").popen(["sleep", "0.5"])
print(h.number)
"""], capture_output=True, text=True, timeout=30)
    assert code.returncode == 0, code.stderr
    call_dir = daemon.root / "s-orphan" / f"c-{code.stdout.strip()}"
    deadline = time.monotonic() + 10
    while call_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not call_dir.exists()
    ev = [e for e in Client(daemon.socket).events(session="orphan") if e["type"] == "call.end"]
    assert ev and ev[0]["reason"] == "processes exited; client gone"


def test_refuses_hybrid_host_with_the_fix(tmp_path):
    require_cgroup2()
    info = detect_hierarchy()
    if info.refusal(["cpu", "memory", "pids"]) is None:
        pytest.skip("this host has cgroup v2 controllers: nothing to refuse")
    out = subprocess.run([sys.executable, "-m", "agentcg.daemon.app", "--runtime-dir", str(tmp_path),
                          "--cgroup-root", f"{info.cgroup2_mount}/agentcg-refuse-{os.getpid()}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert "refusing to start" in out.stderr and "cgroup_no_v1=all" in out.stderr
    assert not Path(f"{info.cgroup2_mount}/agentcg-refuse-{os.getpid()}").exists()


def test_clean_stop_leaves_calls_running_and_teardown_removes_everything(daemon):
    c = Client(daemon.socket)
    s = c.session("stop")
    h = s.tool_call("sleep").popen(["sleep", "30"])
    daemon.stop(signal.SIGTERM)                        # clean stop: agents keep running
    assert daemon.proc.returncode == 0
    assert h.proc.poll() is None and (daemon.root / "s-stop" / f"c-{h.number}").is_dir()
    daemon.args.append("--teardown")
    daemon.start()
    daemon.stop(signal.SIGTERM)                        # --teardown: kill and remove the tree
    assert h.proc.wait(10) == -signal.SIGKILL
    assert not (daemon.root / "s-stop").exists()


def test_straggler_policy_keep(request, tmp_path):
    mnt = require_cgroup2()
    conf = tmp_path / "agentcg.toml"
    conf.write_text('[daemon]\nstraggler_policy = "keep"\nwatch_interval_ms = 50\n')
    gen = start_daemon(request, mnt)
    d = next(gen)
    try:
        d.stop()
        d.args += ["--config", str(conf)]
        d.start()
        c = Client(d.socket)
        s = c.session("keep")
        r = s.run(["sh", "-c", "sleep 0.5 >/dev/null 2>&1 &"])
        assert r.stats["stragglers"] == 1 and r.stats["stragglers_action"] == "kept"
        assert [f["kind"] for f in r.feedback] == ["stragglers_kept"]
        call_dir = d.root / "s-keep" / f"c-{r.call}"
        assert call_dir.is_dir()                       # kept while the straggler runs
        deadline = time.monotonic() + 10
        while call_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not call_dir.exists()                   # removed once it exited
        s.end()
    finally:
        for _ in gen:
            pass


def test_attach_and_end_moves_the_agent_back(daemon):
    c = Client(daemon.socket)
    agent = subprocess.Popen(["sleep", "30"])
    try:
        before = Path(f"/proc/{agent.pid}/cgroup").read_text()
        s = c.session("att")
        s.attach(agent.pid)
        assert c.show("att")["agent_pids"] == [agent.pid]
        mount = detect_hierarchy().cgroup2_mount
        line = [x for x in Path(f"/proc/{agent.pid}/cgroup").read_text().splitlines() if x.startswith("0::")][0]
        assert mount + line[3:] == str(daemon.root / "s-att" / "agent")
        s.end()
        assert Path(f"/proc/{agent.pid}/cgroup").read_text() == before
        assert agent.poll() is None                       # ending a session never kills the agent
    finally:
        agent.kill()
        agent.wait()


def test_oversized_message_is_refused_without_buffering(daemon):
    import socket as so
    from agentcg import protocol as p
    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.connect(daemon.socket)
    s.settimeout(10)
    try:
        s.sendall(b'{"v":1,"id":1,"op":"status","pad":"' + b"x" * (2 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = p.decode(p.LineReader(s).readline())
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    s.close()
    assert Client(daemon.socket).status()["daemon"]["pid"] == daemon.proc.pid   # still serving


def test_async_client_runs_a_placed_call(daemon):
    import asyncio
    from agentcg.client.aio import AsyncClient

    async def go():
        async with AsyncClient(daemon.socket) as c:
            async with await c.session("aio") as s:
                r = await s.run(["cat", "/proc/self/cgroup"], intent="pids=8", stdout=subprocess.PIPE)
                assert r.exit_status == 0 and r.limits["pids_max"] == 8
                assert r.stdout.decode().strip().endswith("/s-aio/c-1")
                r2 = await s.run(["sh", "-c", "exit 4"])
                assert r2.exit_status == 4 and r2.call == 2
            assert await c.sessions() == []
            kinds = [e["type"] async for e in c.events(session="aio")]
            assert kinds[0] == "session.create" and kinds[-1] == "session.end"
    asyncio.run(go())


def test_restart_without_state_adopts_the_tree(daemon):
    c = Client(daemon.socket)
    s = c.session("adopt")
    h = s.tool_call("sleep").popen(["sh", "-c", "sleep 1; exit 2"])
    daemon.stop(signal.SIGKILL)
    (daemon.runtime / "state.json").unlink()          # the state file is lost too
    daemon.start()
    sessions = Client(daemon.socket).sessions()
    assert [x["name"] for x in sessions] == ["adopt"] and sessions[0]["running_calls"] == 1
    r = h.wait()
    assert r.exit_status == 2 and r.stats["wall_ns"] >= 900_000_000
    assert gone_soon(daemon.root / "s-adopt" / f"c-{h.number}")
    s.end()


def test_descriptors_opened_ahead_for_calls_are_closed(daemon):
    """A spare call cgroup's accounting files are opened when it is made and
    closed when its call ends, when the session ends with it unused, and
    when a call's processes are kept: the daemon holds no more after."""
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")

    def settled(want) -> int:          # an ended call's descriptors are closed right after its reply
        deadline = time.monotonic() + 5
        while not want(n := len(os.listdir(fd_dir))) and time.monotonic() < deadline:
            time.sleep(0.01)
        return n
    c = Client(daemon.socket)
    s = c.session("fds")
    s.run(["true"])                                    # the first spare is in use
    time.sleep(0.1)
    before = len(os.listdir(fd_dir))
    for _ in range(30):
        assert s.run(["true"]).exit_status == 0
    h = s.tool_call("err").popen(["sh", "-c", "exit 3"])
    assert h.wait().exit_status == 3
    assert settled(lambda n: n == before) == before
    s.end()
    c2 = Client(daemon.socket)
    s2 = c2.session("fds2")
    s2.end()
    c.close()
    c2.close()
    after = settled(lambda n: n < before)
    assert after < before, (before, after)           # both sessions' spares and both connections are gone
