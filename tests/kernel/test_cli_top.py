"""agentcg top against a real agentcgd on this host's cgroup2 tree: --once
with a session and a running call, and the live view in a tmux pane (the
session appears, a call started later appears because of its event, the
view survives a resize to a narrow pane, q exits 0).

AGENTCG_TOP_CAPTURE=docs/top.txt saves the live pane as the README's screen."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_cli_daemon import AGENTCG, daemon_env, run  # noqa: F401  (daemon_env: the fixture)

pytestmark = pytest.mark.kernel
CAPTURE_ENV = "AGENTCG_TOP_CAPTURE"


def _start_call(env, session: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(AGENTCG + ["run", "--session", session, "--name", name, "--", "sleep", "120"], env=env)


def _wait_running(env, session: str, n: int) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        show = json.loads(run(env, "session", "show", session, "--json").stdout)
        if len([c for c in show["calls"] if c.get("pid")]) >= n:   # clone_into: the pid comes with call.started
            return show
        time.sleep(0.1)
    pytest.fail(f"{n} calls never ran in {session}")


def _stop(procs) -> None:
    for p in procs:
        p.terminate()   # agentcg run passes it on to the command, then ends the call
        p.wait(30)


def test_once_shows_the_session_its_running_call_and_limits(daemon_env):
    env, root = daemon_env
    assert run(env, "session", "create", "tw", "--intent", "memory=128M,memory_max=256M,priority=6").returncode == 0
    assert run(env, "session", "create", "other").returncode == 0
    call = _start_call(env, "tw", "sleeper")
    try:
        pid = _wait_running(env, "tw", 1)["calls"][0]["pid"]
        res = run(env, "top", "--once")
        assert res.returncode == 0, res.stderr
        text = res.stdout
        assert "\x1b" not in text        # no terminal control codes for scripts
        lines = text.splitlines()
        assert lines[0].startswith("agentcg top ") and "sessions 2  running calls 1" in lines[0]
        assert lines[1].startswith("policy: ladder level 0 (none)")
        assert f"root {root}" in lines[2]
        head = next(line for line in lines if line.startswith("session tw "))
        assert "calls 1 running, 0 done" in head
        budget = lines[lines.index(head) + 1]
        assert "memory.low 128M" in budget and "memory.max 256M" in budget and "pressure -" in budget
        header = lines.index(head) + 2
        assert lines[header].split() == ["CALL", "NAME", "PID", "TIME", "MEM", "MEM.HIGH", "MEM.MAX", "CPU"]
        row = lines[header + 1].split()
        assert row[:3] == ["c-1", "sleeper", str(pid)]
        other = next(line for line in lines if line.startswith("session other "))
        assert lines[lines.index(other) + 2] == "  no running calls"
        assert "last policy actions" in lines
        only = run(env, "top", "--once", "--session", "other").stdout
        assert "session other " in only and "session tw " not in only
    finally:
        _stop([call])


def _save(path: Path, screen: str) -> None:
    """The screen without its trailing blanks, empty rows squeezed to one."""
    lines: list[str] = []
    for line in (row.rstrip() for row in screen.splitlines()):
        if line or (lines and lines[-1]):
            lines.append(line)
    path.write_text("\n".join(lines).strip() + "\n")


class Pane:
    """One tmux server of the test's own, one pane running a command."""

    def __init__(self, tmp: Path, command: str, width: int, height: int):
        self.base = ["tmux", "-S", str(tmp / "tmux.sock")]
        subprocess.run(self.base + ["new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                                    command], check=True)

    def screen(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p", "-t", "top"], capture_output=True,
                              text=True, check=True).stdout

    def wait_for(self, text: str = "", timeout_s: float = 60, *, until=None) -> str:
        """The screen once it shows text (and satisfies until(screen))."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen and (until is None or until(screen)):
                return screen
            time.sleep(0.1)
        pytest.fail(f"{text!r} never appeared on the screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "top", *keys], check=True)

    def resize(self, width: int, height: int) -> None:
        subprocess.run(self.base + ["resize-window", "-t", "top", "-x", str(width), "-y", str(height)], check=True)

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (scripts/setup.sh installs it)")
def test_live_view_follows_events_resizes_and_quits_with_q(daemon_env, tmp_path):
    env, _ = daemon_env
    assert run(env, "session", "create", "live", "--intent", "memory_max=512M").returncode == 0
    exported = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("AGENTCG_SOCKET", "PATH") if k in env)
    # a fallback refresh far beyond the test: whatever changes on the screen came from an event
    top = " ".join(shlex.quote(a) for a in AGENTCG + ["top", "--interval", "3600"])
    pane = Pane(tmp_path, f"env {exported} TERM=xterm-256color {top}; echo top-exit=$?; sleep 120", 120, 32)
    calls = []
    try:
        pane.wait_for("session live ")
        assert "no running calls" in pane.screen()
        calls.append(_start_call(env, "live", "builder"))
        screen = pane.wait_for("builder")
        assert "calls 1 running, 0 done" in screen
        calls.append(_start_call(env, "live", "tester"))
        screen = pane.wait_for("tester")
        assert "calls 2 running, 0 done" in screen and "c-2" in screen
        if os.environ.get(CAPTURE_ENV):
            _save(Path(os.environ[CAPTURE_ENV]), screen)
        pane.resize(44, 12)
        # redrawn for the new size: the header on top, the help line at the bottom
        narrow = pane.wait_for(until=lambda screen: screen.splitlines()[0].startswith("agentcg top")
                               and screen.splitlines()[11].startswith("q quit"))
        assert all(len(line) <= 44 for line in narrow.splitlines())
        assert "session live " in narrow
        _stop(calls[:1])
        pane.wait_for("tester", until=lambda screen: "builder" not in screen)   # its call.end
        pane.keys("q")
        pane.wait_for("top-exit=0")
    finally:
        pane.close()
        _stop(calls[1:] if len(calls) > 1 else calls)
