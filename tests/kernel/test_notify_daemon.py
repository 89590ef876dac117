"""agentcgd speaks sd_notify as systemd expects: READY=1 once the socket
listens, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_cgroup2

pytestmark = pytest.mark.kernel


def test_daemon_notifies_ready_watchdog_stopping(tmp_path):
    mnt = require_cgroup2()
    tag = f"agentcg-test-{os.getpid()}-notify"
    root, runtime = mnt / tag, Path("/tmp") / tag
    runtime.mkdir(exist_ok=True)
    notify_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(notify_path))
    rx.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "agentcg.daemon.app", "--cgroup-root", str(root),
                             "--runtime-dir", str(runtime), "--no-require-controllers", "--log-level", "warning"],
                            env=env, cwd=runtime, stderr=subprocess.DEVNULL)
    try:
        first = rx.recv(4096).decode()
        assert first.startswith("READY=1\n"), first
        assert "STATUS=serving on" in first
        assert (runtime / "agentcg.sock").exists()      # READY only once it listens
        rx.settimeout(5)   # three pings at WATCHDOG_USEC/2 = 0.2 s, not once a minute: recv times out otherwise
        pings = 0
        while pings < 3:
            msg = rx.recv(4096).decode()
            pings += msg == "WATCHDOG=1\n"
        rx.settimeout(60)
        proc.send_signal(signal.SIGTERM)
        while True:
            msg = rx.recv(4096).decode()
            if msg != "WATCHDOG=1\n":
                break
        assert msg.startswith("STOPPING=1\n"), msg
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rx.close()
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
            try:
                d.rmdir()
            except OSError:
                pass
        shutil.rmtree(runtime, ignore_errors=True)
