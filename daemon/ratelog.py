"""Log lines that a client can provoke, rate-limited so that no uid can
flood the daemon's log.

Any uid may connect to the socket, so anything logged because of what a
client sent (a malformed request, a request that trips a bug) goes through a
token bucket per key: `burst` lines at once, then `rate_per_s`; the lines
dropped meanwhile are counted and reported with the next line let through
("N similar messages suppressed"). Keys are bounded (the oldest is forgotten),
so a flood of keys cannot grow memory either.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable


@dataclass
class _Bucket:
    tokens: float
    last_s: float
    suppressed: int = 0


class LogLimiter:
    def __init__(self, logger: logging.Logger, *, rate_per_s: float = 0.2, burst: int = 5,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def _take(self, key: Hashable) -> tuple[bool, int]:
        """(allowed, lines suppressed before this one under key)."""
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(tokens=float(self.burst), last_s=now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(float(self.burst), b.tokens + (now - b.last_s) * self.rate_per_s)
            b.last_s = now
        if b.tokens < 1.0:
            b.suppressed += 1
            return False, 0
        b.tokens -= 1.0
        dropped, b.suppressed = b.suppressed, 0
        return True, dropped

    def log(self, level: int, key: Hashable, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log msg % args under key's budget; False when it was suppressed."""
        if not self.logger.isEnabledFor(level):
            return False
        allowed, dropped = self._take(key)
        if not allowed:
            return False
        if dropped:
            msg = f"{msg} ({dropped} similar messages suppressed)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


def exception_site(exc: BaseException) -> tuple[str, str, int]:
    """Where an exception was raised: (type, file, line) of its innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return type(exc).__name__, last.filename if last else "?", last.lineno or 0 if last else 0


class BugLog:
    """Unexpected exceptions: a traceback the first time a site fails, then
    one rate-limited line per site (a client that found a bug can repeat it
    at will)."""

    def __init__(self, logger: logging.Logger, limiter: LogLimiter | None = None, max_sites: int = 256):
        self.logger = logger
        self.limiter = limiter or LogLimiter(logger, rate_per_s=1 / 60, burst=1)
        self.max_sites = max_sites
        self._seen: set[tuple[str, str, int]] = set()

    def report(self, what: str, exc: BaseException) -> None:
        site = exception_site(exc)
        where = f"{site[1]}:{site[2]}"
        if site not in self._seen and len(self._seen) < self.max_sites:
            self._seen.add(site)
            self.logger.error("%s: %s at %s", what, site[0], where, exc_info=exc)
            return
        self.limiter.log(logging.ERROR, site, "%s: %s at %s again (a traceback is logged once per site)",
                         what, site[0], where)
