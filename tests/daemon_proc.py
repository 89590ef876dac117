"""A real agentcgd as a process of a test's own, on the cgroup root and runtime
directory that conftest.daemon_dirs names after the test.

    from daemon_proc import Agentcgd, start_daemon

`start_daemon` is a generator for fixtures (`yield from start_daemon(...)`):
it starts the daemon and, once the test is done, stops it and removes its
cgroup tree and runtime directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import daemon_dirs, remove_daemon_tree


class Agentcgd:
    def __init__(self, root: Path, runtime: Path, extra_args: list[str] | None = None,
                 require_controllers: bool = False, start_timeout_s: float = 120.0):
        self.root, self.runtime = root, runtime
        self.args = [sys.executable, "-m", "agentcg.daemon.app", "--cgroup-root", str(root),
                     "--runtime-dir", str(runtime), "--log-level", "warning", *(extra_args or [])]
        if not require_controllers:
            self.args.append("--no-require-controllers")
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.socket = str(runtime / "agentcg.sock")

    def start(self) -> "Agentcgd":
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentcgd exited: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("agentcgd did not start listening")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def client_env(self, **extra: str) -> dict[str, str]:
        """os.environ for a client process of this daemon: AGENTCG_SOCKET set, no
        session or hint inherited from the test's own environment."""
        env = dict(os.environ, AGENTCG_SOCKET=self.socket, **extra)
        for key in ("AGENTCG_SESSION", "AGENT_RESOURCE_HINT"):
            env.pop(key, None)
        return env


def start_daemon(request: Any, mnt: Path, require_controllers: bool = False, *,
                 config: str | None = None, stop_signal: int = signal.SIGKILL) -> Iterator[Agentcgd]:
    """A daemon under <mnt>/agentcg-test-..., stopped and cleaned up by the generator.

    `config`: TOML written to <runtime>/agentcg.toml and passed as --config;
    `stop_signal`: how it is stopped (SIGKILL after 10 s if that does not end it).
    """
    root, runtime = daemon_dirs(request, mnt)
    extra_args = None
    if config is not None:
        (runtime / "agentcg.toml").write_text(config)
        extra_args = ["--config", str(runtime / "agentcg.toml")]
    d = Agentcgd(root, runtime, extra_args, require_controllers=require_controllers)
    try:
        yield d.start()
    finally:
        try:
            d.stop(stop_signal)
        except subprocess.TimeoutExpired:
            d.stop(signal.SIGKILL)
        if root.is_dir():
            remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)


def poll(pred: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """pred()'s first true value within timeout_s, else its last (false) value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval_s)
    return pred()
