"""Restart safety of the real daemon on this host's cgroup2 tree (no
controllers needed): requests whose replies a kill -9 lost are answered the
same when a client sends them again, and each call.end event is written once."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from conftest import require_cgroup2
from test_daemon_host import gone_soon, start_daemon
from agentcg.client import Client

pytestmark = pytest.mark.kernel


@pytest.fixture
def daemon(request):
    yield from start_daemon(request, require_cgroup2())


def _waiting_child() -> subprocess.Popen:
    # a child of this process that the daemon may place (call.start checks the parent)
    return subprocess.Popen(["sh", "-c", "sleep 0.3; exit 5"])


def _events(d, session: str, kind: str = "call.end") -> list[dict]:
    log = [json.loads(x) for x in (d.runtime / "events.jsonl").read_text().splitlines()]
    return [e for e in log if e["type"] == kind and e.get("session") == session]


def test_call_end_sent_again_after_a_restart_gets_the_same_result(daemon):
    c = Client(daemon.socket)
    c.session("again")
    child = _waiting_child()
    n = c.request("call.start", session="again", pid=child.pid, name="sh", token="t-1")["call"]
    child.wait()
    first = c.request("call.end", session="again", call=n, exit_status=5)
    daemon.stop(signal.SIGKILL)          # as if the reply had been lost in the crash
    daemon.start()
    second = Client(daemon.socket).request("call.end", session="again", call=n, exit_status=5)
    assert second["exit_status"] == 5 and second["stats"] == first["stats"]
    assert len(_events(daemon, "again")) == 1


def test_call_start_sent_again_after_a_restart_is_the_same_call(daemon):
    c = Client(daemon.socket)
    c.session("token")
    child = subprocess.Popen(["sleep", "30"])
    try:
        first = c.request("call.start", session="token", pid=child.pid, name="sleep", token="t-2")
        daemon.stop(signal.SIGKILL)
        daemon.start()
        c2 = Client(daemon.socket)
        second = c2.request("call.start", session="token", pid=child.pid, name="sleep", token="t-2")
        assert second["call"] == first["call"] and second["cgroup"] == first["cgroup"]
        assert c2.show("token")["running_calls"] == 1
    finally:
        child.kill()
        child.wait()
    c2.request("call.end", session="token", call=first["call"], exit_status=137)
    assert gone_soon(daemon.root / "s-token" / f"c-{first['call']}")
    ends = _events(daemon, "token")
    assert len(ends) == 1 and ends[0]["exit_status"] == 137
    c2.request("session.end", name="token")
    assert not (daemon.root / "s-token").exists()


def test_call_end_event_cut_off_by_a_crash_is_written_once_on_restart(daemon):
    c = Client(daemon.socket)
    c.session("cut")
    child = _waiting_child()
    n = c.request("call.start", session="cut", pid=child.pid, name="sh", token="t-3")["call"]
    child.wait()
    c.request("call.end", session="cut", call=n, exit_status=5)
    daemon.stop(signal.SIGKILL)
    # the crash came after the journal's end line, in the middle of the event's line
    journal = (daemon.runtime / "state.json.journal").read_text().splitlines()
    end = [json.loads(x) for x in journal if json.loads(x)["op"] == "end"][-1]
    log = daemon.runtime / "events.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[:end["log_bytes"] + 20])
    daemon.start()
    daemon.stop(signal.SIGKILL)
    daemon.start()                       # a second restart writes nothing more
    ends = _events(daemon, "cut")
    assert len(ends) == 1 and ends[0]["exit_status"] == 5 and ends[0]["call"] == n
