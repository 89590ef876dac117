"""The daemon's rate-limited log for what clients can provoke."""
from __future__ import annotations

import logging

from agentcg.daemon.ratelog import BugLog, LogLimiter


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _logger(name: str) -> tuple[logging.Logger, list[logging.LogRecord]]:
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    logger = logging.getLogger(name)
    logger.handlers[:] = [Keep()]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, got


def test_a_burst_then_the_rate_and_the_count_of_what_was_suppressed():
    logger, got = _logger("agentcg.test.ratelog")
    clock = Clock()
    lim = LogLimiter(logger, rate_per_s=0.5, burst=3, clock=clock)
    sent = [lim.log(logging.INFO, 1000, "bad %d", i) for i in range(10)]
    assert sent == [True] * 3 + [False] * 7
    assert lim.log(logging.INFO, 2000, "other uid")          # its own bucket
    clock.now_s = 2.0                                        # one token back
    assert lim.log(logging.INFO, 1000, "bad again")
    assert not lim.log(logging.INFO, 1000, "bad again")
    assert [r.getMessage() for r in got] == ["bad 0", "bad 1", "bad 2", "other uid",
                                             "bad again (7 similar messages suppressed)"]


def test_keys_are_bounded():
    logger, _got = _logger("agentcg.test.ratelog2")
    lim = LogLimiter(logger, max_keys=10)
    for uid in range(1000):
        lim.log(logging.INFO, uid, "x")
    assert len(lim._buckets) == 10


def test_a_bug_logs_its_traceback_once_per_site():
    logger, got = _logger("agentcg.test.buglog")
    bugs = BugLog(logger)

    def fail(kind: type[Exception]) -> Exception:
        try:
            raise kind("detail")
        except Exception as exc:
            return exc

    for _ in range(20):
        bugs.report("request failed", fail(RuntimeError))
    bugs.report("request failed", fail(KeyError))
    assert [r.exc_info is not None for r in got] == [True, False, True]
