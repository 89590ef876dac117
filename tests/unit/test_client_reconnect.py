"""The clients' reconnect policy (agentcg/client/core.py), without a daemon."""
from __future__ import annotations

import pytest

from agentcg import protocol as p
from agentcg.client import Client
from agentcg.client.core import (DEFAULT_RECONNECT_TIMEOUT_S, MAX_DELAY_S, RECONNECT_ENV, Attempts,
                                 DaemonUnavailable, give_up_at_once, reconnect_timeout_s)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sleeps_until_given_up(timeout_s: float, rng=lambda: 0.5) -> list[float]:
    clock = FakeClock()
    a = Attempts("call.end", {"session": "s", "call": 1}, timeout_s, clock=clock, rng=rng)
    sleeps = []
    with pytest.raises(DaemonUnavailable):
        while True:
            d = a.next_delay(EOFError("closed"))
            sleeps.append(d)
            clock.now += d
    return sleeps


def test_backoff_stops_at_the_bound():
    for timeout_s in (0.0, 0.3, 5.0, 30.0):
        for rng in (lambda: 0.0, lambda: 0.5, lambda: 0.999):
            sleeps = _sleeps_until_given_up(timeout_s, rng)
            assert sum(sleeps) == pytest.approx(timeout_s)     # waits the whole bound, never longer
            assert all(0 < d <= MAX_DELAY_S * 1.5 for d in sleeps)


def test_backoff_grows_then_is_capped():
    sleeps = _sleeps_until_given_up(30.0)
    assert sleeps[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert max(sleeps) == pytest.approx(MAX_DELAY_S)
    assert len(sleeps) < 40                                      # no busy loop against a dead socket


def test_zero_bound_gives_up_at_once_with_the_cause():
    a = Attempts("status", {}, 0.0, clock=FakeClock())
    with pytest.raises(DaemonUnavailable, match="lost the connection to agentcgd: closed"):
        a.next_delay(EOFError("closed"))


def test_resent_requests_mean_the_same():
    a = Attempts("session.create", {"name": "x", "exist_ok": False}, 5.0, clock=FakeClock())
    a.next_delay(EOFError())
    assert a.fields["exist_ok"] is True                         # the lost try may have made it
    e = Attempts("session.end", {"name": "x"}, 5.0, clock=FakeClock())
    gone = p.ProtocolError(p.E_NOT_FOUND, "session: 'x' does not exist")
    with pytest.raises(p.ProtocolError):
        e.after_error(gone)                                      # not resent: a real error
    e.next_delay(EOFError())
    assert e.after_error(gone)["ended_before_reconnect"] is True


def test_reconnect_bound_from_argument_environment_default(monkeypatch):
    monkeypatch.delenv(RECONNECT_ENV, raising=False)
    assert reconnect_timeout_s() == DEFAULT_RECONNECT_TIMEOUT_S
    monkeypatch.setenv(RECONNECT_ENV, "2.5")
    assert reconnect_timeout_s() == 2.5 and Client("/nonexistent").reconnect_timeout_s == 2.5
    assert Client("/nonexistent", reconnect_timeout_s=7).reconnect_timeout_s == 7
    monkeypatch.setenv(RECONNECT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{RECONNECT_ENV}: 'soon' is not a number"):
        reconnect_timeout_s()
    with pytest.raises(ValueError, match="-1"):
        reconnect_timeout_s(-1)


def test_first_connection_waits_only_for_a_refusing_socket():
    refused = DaemonUnavailable("x", refused=True)
    missing = DaemonUnavailable("x")
    assert give_up_at_once(False, False, refused) and give_up_at_once(False, True, missing)
    assert not give_up_at_once(False, True, refused)
    assert not give_up_at_once(True, False, missing)             # reached once: a restart


def test_client_without_a_daemon_fails_at_once(tmp_path):
    with pytest.raises(DaemonUnavailable, match="cannot reach agentcgd"):
        Client(str(tmp_path / "none.sock"), wait_for_daemon=True).status()
