"""Per-command duration estimate: normalisation, robust EWMA, fallbacks, LRU, round trip."""
from __future__ import annotations

import json
import math

import pytest

from agentcg.core.durations import Durations, normalise


@pytest.mark.parametrize("cmd, key", [
    (["pytest", "-q", "tests/unit/test_x.py"], "pytest"),
    (["/usr/bin/pip", "install", "-e", "."], "pip install"),
    (["git", "status"], "git status"),
    (["git", "-C", "/repo", "status", "--short"], "git status"),
    ("python3.11 -m pytest -x tests", "pytest"),
    ("python -m pip install requests", "pip install"),
    ("python tools/gen_code.py --out x", "gen_code.py"),
    ("FOO=1 timeout 30 make -j 8 test", "make test"),
    ("bash -c 'cargo build --release && ./run'", "cargo build"),
    ("sudo -u bob env A=1 npm run lint", "npm run"),
    (["ls", "-la", "/tmp"], "ls"),
    ("pytest tests", "pytest"),
    ("uv run pytest", "uv run"),
    ("echo 'unbalanced", "echo"),
    ([], ""),
])
def test_normalise(cmd, key):
    assert normalise(cmd) == key


def test_steady_runs_then_one_outlier_barely_moves_the_estimate():
    d = Durations()
    for _ in range(10):
        d.record("s1", ["pytest", "tests"], 2.0)
    assert d.estimate("s1", "pytest -q").duration_s == pytest.approx(2.0)
    d.record("s1", ["pytest", "tests"], 600.0)
    est = d.estimate("s1", "pytest")
    # a plain EWMA of log-durations would say 8.3 s; the clipped step says 2.4 s
    assert 2.0 < est.duration_s < 2.5
    assert est.p75_s > est.duration_s            # the outlier widened the spread


def test_a_command_that_became_slower_is_followed_within_a_few_runs():
    d = Durations()
    for _ in range(10):
        d.record("s1", "make test", 2.0)
    for _ in range(8):
        d.record("s1", "make test", 600.0)
    assert d.estimate("s1", "make test").duration_s > 250.0


def test_estimate_is_the_geometric_mean_of_alternating_runs():
    d = Durations()
    for i in range(200):
        d.record("s1", "cargo build", 1.0 if i % 2 else 100.0)
    assert d.estimate("s1", "cargo build").duration_s == pytest.approx(10.0, rel=0.35)


def test_order_of_trust_intent_session_host_default():
    d = Durations(default_s=7.0)
    assert d.estimate("s1", "pytest").source == "default" and d.estimate("s1", "pytest").duration_s == 7.0
    d.record("s2", "pytest", 40.0)
    est = d.estimate("s1", "pytest")
    assert (est.source, est.duration_s, est.samples) == ("host", pytest.approx(40.0), 1)
    d.record("s1", "pytest", 4.0)
    est = d.estimate("s1", "pytest")
    assert (est.source, est.duration_s) == ("session", pytest.approx(4.0))
    assert d.estimate("s1", "pytest", declared_s=90.0).source == "intent"
    d.forget_session("s1")
    assert d.estimate("s1", "pytest").source == "host"


def test_memory_is_bounded_least_recently_used_goes_first():
    d = Durations(host_commands=3, session_commands=2, sessions=2)
    for cmd in ("a", "b", "c"):
        d.record("s1", cmd, 1.0)
    d.record("s1", "a", 1.0)                 # a is recent again
    d.record("s1", "d", 1.0)                 # host drops b
    assert list(d.host) == ["c", "a", "d"]
    assert list(d.by_session["s1"]) == ["a", "d"]
    d.record("s2", "a", 1.0)
    d.record("s3", "a", 1.0)
    assert list(d.by_session) == ["s2", "s3"]


def test_round_trips_through_json_keeping_estimates_and_order():
    d = Durations()
    for i, t in enumerate([3.0, 5.0, 4.0, 30.0, 3.5]):
        d.record("s1", "pytest", t)
        d.record(f"s{i}", "pip install x", t * 10)
    back = Durations.from_dict(json.loads(json.dumps(d.to_dict())))
    for ses in ("s1", "s3", "nobody"):
        for cmd in ("pytest", "pip install"):
            a, b = d.estimate(ses, cmd), back.estimate(ses, cmd)
            assert (a.source, a.samples) == (b.source, b.samples)
            assert math.isclose(a.duration_s, b.duration_s, rel_tol=1e-5)
    assert list(back.by_session) == list(d.by_session)


def test_bad_state_and_input_are_named():
    with pytest.raises(ValueError, match="version"):
        Durations.from_dict({"host": {}})
    with pytest.raises(ValueError, match=r"durations.host\['pytest'\]"):
        Durations.from_dict({"version": 1, "host": {"pytest": [0, 1.0, 0.0]}})
    with pytest.raises(ValueError, match="duration_s"):
        Durations().record("s1", "pytest", -1.0)
