"""The inference worker as agentcgd's child: start, readiness, restart, stop.

With `[worker] enabled = true` and a `model`, agentcgd starts `agentcg-worker`
in a cgroup of its own, `<root>/worker`, with `memory.max` from
`worker.memory_max` (where the memory controller is enabled), so that the
worker's pinned host KV pool is accounted like any other memory. The child
enters that cgroup before it execs the worker (a shell writes `0` to
`cgroup.procs`, then `exec`s), so nothing of it runs outside.

The worker is up once its control socket answers `ping`. When it exits it is
started again after `restart_backoff_s`, doubled for each crash in a row up
to `restart_backoff_max_s`; a worker that stayed up `stable_after_s` starts
the count again. At daemon stop it gets SIGTERM (SIGKILL after 5 s). A worker
left running by a daemon that was killed is killed at the next start, which
then starts a fresh one.

With `enabled = true` and no `model`, nothing is started: the supervisor
attaches to the worker that listens on `control_socket` and reports whether
it answers.

A hook (daemon/hooks.py): `run` supervises, `status` is shown by
`agentcg status` under hooks.worker.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable

from agentcg.adapters.cgroupfs import CgroupFs, CgroupGone
from agentcg.adapters.executor import Executor
from agentcg.adapters.worker import UNKNOWN, WorkerAdapter
from agentcg.core.config_gpu import WorkerConfig

log = logging.getLogger("agentcg.daemon.worker")
CGROUP = "worker"
READY_RE = re.compile(r"agentcg-worker ready: (\S+)")
STOP_GRACE_S = 5.0
PING_EVERY_S = 0.1
# the child moves itself into its cgroup, then becomes the worker
ENTER_AND_EXEC = 'echo 0 > "$1" || exit 125; shift; exec "$@"'


def backoff_s(cfg: WorkerConfig, crashes_in_a_row: int) -> float:
    """Delay before the next start after `crashes_in_a_row` (>= 1) crashes."""
    return min(cfg.restart_backoff_max_s, cfg.restart_backoff_s * 2 ** max(0, crashes_in_a_row - 1))


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == 125:
        return "could not enter its cgroup"
    return f"exited with status {rc}"


class WorkerHost:
    """Supervises one worker (or watches an attached one)."""

    name = "worker"

    def __init__(self, cfg: WorkerConfig, cgfs: CgroupFs | None, runtime_dir: str, *,
                 executor: Executor | None = None, command: list[str] | None = None, emit: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.cgfs = cgfs
        # every write to the worker's cgroup goes through the daemon's one writer
        self.executor = executor if executor is not None or cgfs is None else Executor(cgfs)
        self.socket = cfg.socket_in(runtime_dir)
        self.command = command or [sys.executable, "-m", "agentcg.worker.main"]
        self.emit = emit or (lambda event: None)
        # the adapter the rest of the daemon talks through (daemon/gpu.py)
        self.adapter = WorkerAdapter(self.socket)
        self._probe = WorkerAdapter(self.socket, fast_timeout_s=1.0, retry_s=0.0)
        self.state = "attaching" if cfg.attach else "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.crashes_in_a_row = 0
        self.last_error: str | None = None
        self.url: str | None = None
        self.up_since: float | None = None
        self.next_start_in_s: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)

    # -- what the rest of the daemon reads -----------------------------------
    @property
    def up(self) -> bool:
        return self.state in ("up", "attached")

    def pids(self) -> list[int]:
        """Every process of the worker (its cgroup's, else the child's pid)."""
        if self.cgfs is not None and not self.cfg.attach:
            try:
                return self.cgfs.procs(CGROUP)
            except (OSError, CgroupGone):
                pass
        return [self.pid] if self.pid else []

    def argv(self) -> list[str]:
        c = self.cfg
        argv = [*self.command, "--model", c.model, "--device", c.device, "--host", c.host,
                "--port", str(c.port), "--control-socket", self.socket, "--control-socket-mode", "600",
                "--gpu-memory-fraction", str(c.gpu_memory_fraction), "--quiet"]
        if c.gpu_blocks:
            argv += ["--gpu-blocks", str(c.gpu_blocks)]
        if c.host_blocks:
            argv += ["--host-blocks", str(c.host_blocks)]
        return argv + list(c.args)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "mode": "attach" if self.cfg.attach else "child", "pid": self.pid,
                "restarts": self.restarts, "last_error": self.last_error, "url": self.url,
                "control_socket": self.socket, "model": self.cfg.model or None,
                "up_s": round(time.monotonic() - self.up_since, 1) if self.up_since else None,
                "next_start_in_s": self.next_start_in_s}

    # -- supervision -------------------------------------------------------------
    async def run(self, daemon: Any = None) -> None:
        if self.cfg.attach:
            await self._watch_attached()
            return
        self._prepare_cgroup()
        try:
            while True:
                await self._one_life()
                self.crashes_in_a_row += 1
                delay = backoff_s(self.cfg, self.crashes_in_a_row)
                self.state, self.next_start_in_s = "backoff", round(delay, 3)
                log.warning("worker %s; starting it again in %.1f s", self.last_error, delay)
                await asyncio.sleep(delay)
                self.restarts += 1
                self.next_start_in_s = None
        finally:
            await self._stop()

    def _prepare_cgroup(self) -> None:
        if self.cgfs is None:
            return
        try:
            self.cgfs.create(CGROUP)
            if self.cgfs.procs(CGROUP):   # left behind by a daemon that was killed
                log.warning("a worker left running in %s is killed; a fresh one is started", CGROUP)
                self.executor.kill(CGROUP, "worker left by a previous agentcgd")
                self.cgfs.wait_unpopulated(CGROUP, STOP_GRACE_S)
            if self.cfg.memory_max_bytes is not None:
                res = self.executor.apply_limits(CGROUP, {"memory.max": str(self.cfg.memory_max_bytes)},
                                             "worker.memory_max")
                if res["skipped"]:
                    log.warning("worker.memory_max not applied: no memory controller in %s", self.cgfs.root)
        except OSError as exc:
            log.warning("worker cgroup %s: %s; the worker runs in the daemon's cgroup", CGROUP, exc)
            self.cgfs = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        argv = self.argv()
        if self.cgfs is not None:
            procs = self.executor.entry_file(CGROUP)
            argv = ["/bin/sh", "-c", ENTER_AND_EXEC, "sh", procs, *argv]
        return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, start_new_session=True)

    async def _one_life(self) -> None:
        """Start the worker, wait until it answers, then until it exits."""
        self.state, self.url = "starting", None
        self._stderr.clear()
        try:
            proc = self._proc = await self._spawn()
        except OSError as exc:
            self.last_error = f"cannot start {self.command[0]}: {exc}"
            return
        self.pid = proc.pid
        self.emit({"type": "worker.start", "uid": 0, "pid": proc.pid, "restarts": self.restarts})
        log.info("worker started: pid %d (%s)", proc.pid, " ".join(self.argv()))
        readers = [asyncio.create_task(self._read_stdout(proc)), asyncio.create_task(self._read_stderr(proc))]
        try:
            ready = asyncio.create_task(self._wait_ready())
            exited = asyncio.create_task(proc.wait())
            done, _ = await asyncio.wait({ready, exited}, timeout=self.cfg.start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            why = ""
            if ready in done:
                self.state, self.up_since = "up", time.monotonic()
                self.adapter.state = UNKNOWN      # answer again at once, not after its retry delay
                log.info("worker up: pid %d, %s", proc.pid, self.url or "url unknown")
                self.emit({"type": "worker.up", "uid": 0, "pid": proc.pid, "url": self.url})
            else:
                ready.cancel()
                if exited not in done:
                    why = f"did not answer ping on {self.socket} within {self.cfg.start_timeout_s:g} s; "
                    proc.kill()
            rc = await exited
            if self.up_since and time.monotonic() - self.up_since >= self.cfg.stable_after_s:
                self.crashes_in_a_row = 0
            tail = self._stderr[-1] if self._stderr else ""
            self.last_error = why + exit_text(rc) + (f": {tail}" if tail else "")
        finally:
            if proc.returncode is None:     # cancelled (daemon stop): run() stops the worker
                for t in readers:
                    t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        self.state, self.pid, self.up_since, self._proc = "down", None, None, None
        self.emit({"type": "worker.exit", "uid": 0, "pid": proc.pid, "error": self.last_error})

    async def _wait_ready(self) -> bool:
        """Its control socket answers and it printed its ready line (the HTTP
        API listens only after the control socket does)."""
        while True:
            if self.url is not None and (await self._probe.ping()).ok:
                return True
            await asyncio.sleep(PING_EVERY_S)

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            m = READY_RE.search(line)
            if m:
                self.url = m.group(1)
            log.debug("worker: %s", line)

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line[:300])
                log.debug("worker: %s", line)

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        log.info("stopping the worker (pid %d)", proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except asyncio.TimeoutError:
            proc.kill()
        self.state = "stopped"

    def close(self) -> None:
        """At daemon stop, after the run task: nothing of the worker is left."""
        self.adapter.close()
        self._probe.close()
        if self._proc is not None and self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.cgfs is not None and not self.cfg.attach:
            try:
                if self.cgfs.procs(CGROUP):
                    self.executor.kill(CGROUP, "agentcgd stopped")
            except (OSError, CgroupGone):
                pass

    async def _watch_attached(self) -> None:
        while True:
            r = await self._probe.ping()
            was = self.state
            self.state = "attached" if r.ok else "unreachable"
            if r.ok:
                self.pid = (r.result or {}).get("pid") if isinstance(r.result, dict) else None
                if was != "attached":
                    self.adapter.state = UNKNOWN
            else:
                self.last_error = r.message
            if was != self.state:
                log.info("worker on %s: %s -> %s", self.socket, was, self.state)
            await asyncio.sleep(5.0 if r.ok else 1.0)
