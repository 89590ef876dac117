"""Fast memory signals from the kernel: PSI triggers and memory.events changes.

The only code that opens `memory.pressure` for triggers and watches
`memory.events`. No polling loop: both are file descriptors the kernel wakes.

- PSI trigger: write "some 10000 500000" (10 ms of stall within 500 ms; root
  may use windows from 500 ms, others from 2 s) into a cgroup's
  memory.pressure, keep the fd open; the kernel raises POLLPRI each time the
  stall crosses the threshold within a window (at most once per window).
- memory.events (and cgroup.events): kernfs files raise POLLPRI|POLLERR when
  the kernel updates them, e.g. at once on a memory.high breach. Reading the
  file re-arms the notification.

All fds go into one epoll set; `fileno()` is that epoll fd, so asyncio can
wait on it with `loop.add_reader`. `drain()` returns what fired.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Signal:
    key: str          # the caller's name for the cgroup, e.g. "s-42"
    source: str       # "psi" | "events"
    file: str         # interface file name
    t_ns: int         # CLOCK_MONOTONIC when it was drained
    kind: str = ""    # psi: "some"/"full"
    stall_us: int = 0
    window_us: int = 0


UNPRIV_WINDOW_US = 2_000_000


class PsiUnsupported(OSError):
    """The kernel refused a trigger (no PSI, window too small for this user)."""


def _gone(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH)


class SignalWatch:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._by_fd: dict[int, tuple[str, str, str, str, int, int]] = {}
        self._by_key: dict[str, list[int]] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    def _add(self, key: str, fd: int, meta: tuple[str, str, str, str, int, int]) -> None:
        self._ep.register(fd, select.EPOLLPRI | select.EPOLLERR)
        self._by_fd[fd] = meta
        self._by_key.setdefault(key, []).append(fd)

    def watch_pressure(self, key: str, cgroup: str | Path, *, kind: str = "some", stall_us: int = 10_000,
                       window_us: int = 500_000, resource: str = "memory",
                       unprivileged_fallback: bool = True) -> bool:
        """Arm a PSI trigger on <cgroup>/<resource>.pressure. False when the
        cgroup is gone; PsiUnsupported when the kernel refuses the trigger.
        Where a sub-2 s window is refused (no CAP_SYS_RESOURCE) the trigger
        falls back to a 2 s window at the same stall rate; `armed(key)` says
        what was set."""
        if kind not in ("some", "full"):
            raise ValueError(f"kind: 'some' or 'full', got {kind!r}")
        path = Path(cgroup) / f"{resource}.pressure"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if _gone(exc):
                return False
            raise
        tries = [(stall_us, window_us)]
        if unprivileged_fallback and window_us % UNPRIV_WINDOW_US:
            # without CAP_SYS_RESOURCE the kernel takes only whole 2 s windows:
            # keep the same stall rate over the nearest allowed window
            w2 = max(UNPRIV_WINDOW_US, (window_us // UNPRIV_WINDOW_US) * UNPRIV_WINDOW_US)
            tries.append((min(w2, stall_us * w2 // window_us), w2))
        last: OSError | None = None
        for stall, window in tries:
            try:
                os.write(fd, f"{kind} {stall} {window}\n".encode())
            except OSError as exc:
                if _gone(exc):
                    os.close(fd)
                    return False
                last = exc
                continue
            self._add(key, fd, (key, "psi", path.name, kind, stall, window))
            return True
        os.close(fd)
        raise PsiUnsupported(last.errno, f"{path}: trigger '{kind} {stall_us} {window_us}' refused: "
                                         f"{os.strerror(last.errno)}")

    def watch_file(self, key: str, cgroup: str | Path, name: str = "memory.events") -> bool:
        """Wake when the kernel updates <cgroup>/<name>. False when gone."""
        path = Path(cgroup) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.read(fd, 4096)  # arm: kernfs notifies changes after the last read
        except OSError as exc:
            if _gone(exc):
                return False
            raise
        self._add(key, fd, (key, "events", name, "", 0, 0))
        return True

    def unwatch(self, key: str) -> None:
        for fd in self._by_key.pop(key, []):
            try:
                self._ep.unregister(fd)
            except OSError:
                pass
            self._by_fd.pop(fd, None)
            os.close(fd)

    def armed(self, key: str) -> list[tuple[str, str, int, int]]:
        """(file, kind, stall_us, window_us) of each watch under key."""
        return [(m[2], m[3], m[4], m[5]) for fd in self._by_key.get(key, []) for m in [self._by_fd[fd]]]

    def keys(self) -> list[str]:
        return list(self._by_key)

    def drain(self, timeout_s: float = 0.0) -> list[Signal]:
        """What fired; waits up to timeout_s for the first event."""
        out: list[Signal] = []
        for fd, _mask in self._ep.poll(timeout_s):
            meta = self._by_fd.get(fd)
            if meta is None:
                continue
            key, source, name, kind, stall, window = meta
            if source == "events":
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.read(fd, 4096)  # re-arm
                except OSError as exc:
                    if _gone(exc):
                        self.unwatch(key)
                        continue
                    raise
            out.append(Signal(key, source, name, time.monotonic_ns(), kind, stall, window))
        return out

    async def wait(self, timeout_s: float | None = None) -> list[Signal]:
        """Wait for signals on the running asyncio loop (no thread, no polling)."""
        got = self.drain(0)
        if got:
            return got
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        loop.add_reader(self.fileno(), lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            if not self._ep.closed:  # closed while this wait was being cancelled (shutdown)
                loop.remove_reader(self.fileno())
        if self._ep.closed:
            return []
        return self.drain(0)

    def close(self) -> None:
        for key in list(self._by_key):
            self.unwatch(key)
        self._ep.close()


def read_psi(text: str | None) -> dict[str, dict[str, float]]:
    """Parse a *.pressure file: {"some": {"avg10":..,"total":..}, "full": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        vals = {}
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            try:
                vals[k] = float(v)
            except ValueError:
                continue
        out[parts[0]] = vals
    return out
