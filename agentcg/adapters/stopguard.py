"""Continuing the processes the tracker stopped at exec (stop until placed).

In automatic mode the tracker's exec hook sends SIGSTOP to a registered
agent's direct child before it returns to user space, and lists it in the
BPF hash map "stopped" (tgid -> struct agentcg_stopped). The daemon moves the
process into its tool call and continues it (`continue_stopped`). Two things
make sure no process stays stopped:

- a watchdog process (`python -m agentcg.adapters.stopguard`, started by
  `Watchdog`) that holds its own fd of the map: every quarter of the bound it
  continues what has been stopped longer than the bound (a daemon that is
  alive but not answering), and when the daemon's end of its pipe closes (the
  daemon exited or was killed: the kernel closes the fd) it continues
  everything listed and exits;
- the exit hook deletes the entry of a process that died stopped.

A continue is safe against pid reuse: a pidfd is opened first, then the
process's start time (/proc/PID/stat starttime) must equal the one the
kernel recorded at the stop, and SIGCONT goes through the pidfd.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import time

from agentcg.adapters import bpf_types as T

NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class StoppedMap:
    """The tracker's "stopped" map, by fd (works in the watchdog, which has no BPF object)."""

    def __init__(self, lib, fd: int):
        self._lib, self.fd = lib, fd

    def get(self, tgid: int) -> T.AgentcgStopped | None:
        v = T.AgentcgStopped()
        key = ctypes.c_uint32(tgid)
        if self._lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(v)) < 0:
            return None
        return v

    def delete(self, tgid: int) -> None:
        key = ctypes.c_uint32(tgid)
        self._lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))

    def tgids(self) -> list[int]:
        out: list[int] = []
        cur, nxt = None, ctypes.c_uint32()
        while self._lib.bpf_map_get_next_key(self.fd, ctypes.byref(cur) if cur is not None else None,
                                             ctypes.byref(nxt)) == 0:
            out.append(nxt.value)
            cur, nxt = nxt, ctypes.c_uint32()
            if len(out) > T.AGENTCG_MAX_STOPPED:
                break
        return out


def starttime_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time since boot in clock ticks), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def continue_stopped(m: StoppedMap, tgid: int) -> bool:
    """SIGCONT `tgid` if it is still the process the tracker stopped; its entry is dropped.
    True when the signal was sent."""
    try:
        pidfd = os.pidfd_open(tgid)
    except OSError:
        m.delete(tgid)            # gone
        return False
    try:
        entry = m.get(tgid)
        if entry is None:
            return False          # continued already, or exited
        if starttime_ticks(tgid) != entry.start_boottime_ns // NS_PER_TICK:
            m.delete(tgid)        # the pid is another process now
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        except ProcessLookupError:
            pass
        m.delete(tgid)
        return True
    finally:
        os.close(pidfd)


def sweep(m: StoppedMap, older_than_ns: int, now_ns: int | None = None) -> list[int]:
    """Continue every listed process stopped at least `older_than_ns` ago; the tgids continued."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    out = []
    for tgid in m.tgids():
        e = m.get(tgid)
        if e is not None and now_ns - e.stop_ns >= older_than_ns and continue_stopped(m, tgid):
            out.append(tgid)
    return out


class Watchdog:
    """The watchdog process for one tracker's "stopped" map (see the module doc)."""

    def __init__(self, map_fd: int, timeout_ms: int):
        r, self._w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentcg.adapters.stopguard", "--map-fd", str(map_fd),
                 "--pipe-fd", str(r), "--timeout-ms", str(timeout_ms)],
                pass_fds=(map_fd, r), start_new_session=True, stdin=subprocess.DEVNULL)
        finally:
            os.close(r)
        # Popen returns after the exec: the watchdog holds its own map fd from here on
        self.timeout_ms = timeout_ms

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, wait_s: float = 5.0) -> None:
        """Close our end: the watchdog continues what is left and exits."""
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _guard(map_fd: int, pipe_fd: int, timeout_ms: int) -> int:
    from agentcg.adapters.libbpf import Libbpf
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)   # ends when the daemon's end of the pipe closes
    m = StoppedMap(Libbpf.get().lib, map_fd)
    timeout_ns = timeout_ms * 1_000_000
    period_s = max(0.005, timeout_ms / 4000)
    while True:
        ready, _, _ = select.select([pipe_fd], [], [], period_s)
        if ready:
            try:
                data = os.read(pipe_fd, 64)
            except OSError as exc:
                data = b"" if exc.errno != errno.EINTR else b"x"
            if not data:
                sweep(m, 0)
                return 0
        sweep(m, timeout_ns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentcg.adapters.stopguard",
                                 description="Continue processes agentcg's tracker stopped at exec: those "
                                             "stopped longer than --timeout-ms, and all of them when the "
                                             "daemon's end of --pipe-fd closes. Started by agentcgd.")
    ap.add_argument("--map-fd", type=int, required=True, help="fd of the tracker's 'stopped' BPF map")
    ap.add_argument("--pipe-fd", type=int, required=True, help="read end of a pipe the daemon holds open")
    ap.add_argument("--timeout-ms", type=int, required=True, help="longest a process may stay stopped")
    a = ap.parse_args(argv)
    return _guard(a.map_fd, a.pipe_fd, a.timeout_ms)


if __name__ == "__main__":
    sys.exit(main())
