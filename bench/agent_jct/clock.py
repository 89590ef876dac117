"""The replay's time base.

wall (CUDA, the default there): seconds since the start; idle waits sleep, so
asynchronous copies (a prefetch issued at a call's end) really run during the
gap before the next request.

cpu (CPU, the default there): compute sections (engine calls) advance the
clock by the CPU time of this thread (torch set to one thread, so that this is
all of the model's work) and idle waits jump ahead. On a CPU shared with other
jobs the wall clock measures the neighbours more than the engine; CPU time
does not. On CPU every copy is synchronous, inside a compute section, so
nothing runs during a jump.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class WallClock:
    kind = "wall"

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    @contextmanager
    def compute(self) -> Iterator[None]:
        yield

    def idle_until(self, t_s: float) -> None:
        time.sleep(max(0.0, min(t_s - self.now(), 0.05)))


class CpuTimeClock:
    kind = "cpu"

    def __init__(self) -> None:
        self._t = 0.0

    def now(self) -> float:
        return self._t

    @contextmanager
    def compute(self) -> Iterator[None]:
        c0 = time.thread_time()
        try:
            yield
        finally:
            self._t += time.thread_time() - c0

    def idle_until(self, t_s: float) -> None:
        self._t = max(self._t, t_s)


def make_clock(kind: str) -> WallClock | CpuTimeClock:
    if kind == "wall":
        return WallClock()
    if kind == "cpu":
        return CpuTimeClock()
    raise ValueError(f"clock: expected wall or cpu, got {kind!r}")
