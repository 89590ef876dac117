"""An agentcgd of a benchmark's own: its config on a temporary cgroup root, the
process, the wait for its socket and the stop.

Shared by the benchmarks that run their own daemon (soak, metrics_overhead,
toolcall_overhead).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def has_limit_controllers(cgroup_dir: Path) -> bool:
    """Whether `cgroup_dir` offers memory and cpu: without them the daemon runs
    with `require_controllers = false` (real placement, no limits)."""
    return {"memory", "cpu"} <= set((cgroup_dir / "cgroup.controllers").read_text().split())


def daemon_command() -> list[str]:
    """The installed agentcgd next to this interpreter, else the module."""
    daemon_bin = Path(sys.executable).with_name("agentcgd")
    return [str(daemon_bin)] if daemon_bin.exists() else [sys.executable, "-m", "agentcg.daemon.app"]


class BenchDaemon:
    """agentcgd on cgroup root `root`, its config, log and runtime directory under `workdir`.

    `name` keeps several daemons apart in one workdir; `require_controllers`
    None: decided from what `root`'s parent offers; `extra_config`: TOML
    appended after the [daemon] table. Started on construction; `stop()` ends it.
    """

    def __init__(self, root: Path, workdir: Path, *, name: str = "agentcgd",
                 require_controllers: bool | None = None, extra_config: str = "",
                 log_level: str | None = None, start_timeout_s: float = 60.0) -> None:
        if require_controllers is None:
            require_controllers = has_limit_controllers(root.parent)
        self.name = name
        self.root = root
        self.runtime_dir = workdir / ("run" if name == "agentcgd" else f"run-{name}")
        self.socket = self.runtime_dir / "agentcg.sock"
        config = workdir / f"{'agentcg' if name == 'agentcgd' else name}.toml"
        config.write_text(
            "[daemon]\n"
            f'cgroup_root = "{root}"\n'
            f'runtime_dir = "{self.runtime_dir}"\n'
            "use_systemd_cgroup = false\n"
            f"require_controllers = {'true' if require_controllers else 'false'}\n"
            + extra_config
        )
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "w+")
        args = ["--config", str(config)] + (["--log-level", log_level] if log_level else [])
        # cwd not the repo root: its agentcg/ would shadow the installed package
        self.proc = subprocess.Popen(daemon_command() + args, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=workdir)
        self.deadline = time.monotonic() + start_timeout_s
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                self.log.seek(0)
                raise RuntimeError(f"agentcgd {name} did not start (exit {self.proc.poll()}):\n{self.log.read()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; the log is closed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
