"""Session prefix reuse: the next turn reuses the cached context (fewer
prefilled tokens) and gives the same output; suspend swap/keep/drop, resume."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agentcg.worker.engine import Engine, EngineConfig, EngineError, Request  # noqa: E402


def run_one(e, req):
    e.add_request(req)
    toks = []
    while e.has_work():
        toks += [ev.token_id for ev in e.step() if ev.request_id == req.request_id]
    return toks


@pytest.fixture()
def engine():
    return Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=128, chunk_blocks=16, host_blocks=128,
                               measure=False))


def reference_greedy(engine, prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(engine.model.reference_forward(toks)[-1].argmax()))
    return toks[len(prompt):]


@pytest.mark.parametrize("pause", [None, "swap", "keep", "drop", "swap+resume"])
def test_next_turn_reuses_context(engine, pause):
    p1 = [(3 * j) % 200 for j in range(37)]
    o1 = run_one(engine, Request("t1", p1, max_tokens=12, session_id="s"))
    assert engine.stats()["sessions"]["s"]["tokens"] == len(p1) + 11
    if pause:
        mode = pause.split("+")[0]
        r = engine.suspend("s", mode)
        assert r["mode"] == mode
        where = engine.stats()["sessions"].get("s", {}).get("where")
        assert where == {"swap": "host", "keep": "gpu", "drop": None}[mode]
        if pause.endswith("resume"):
            assert engine.resume("s")["swapped_in"] is True
            assert engine.stats()["sessions"]["s"]["where"] == "gpu"
    p2 = p1 + o1 + [5, 6, 7, 8, 9]
    before = engine.counters["prefilled_tokens"]
    o2 = run_one(engine, Request("t2", p2, max_tokens=10, session_id="s"))
    prefilled = engine.counters["prefilled_tokens"] - before
    assert o2 == reference_greedy(engine, p2, 10)
    if pause == "drop":
        assert prefilled == len(p2)
    else:
        # only the last reply token (never run through the model) and the new text
        assert prefilled == 1 + 5
        assert engine.counters["reused_tokens"] == len(p2) - 6
    engine.bm.check()


def test_diverging_prompt_reuses_common_prefix(engine):
    p1 = list(range(40))
    run_one(engine, Request("t1", p1, max_tokens=4, session_id="s"))
    p2 = list(range(20)) + [199] * 10
    before = engine.counters["prefilled_tokens"]
    o2 = run_one(engine, Request("t2", p2, max_tokens=6, session_id="s"))
    assert engine.counters["prefilled_tokens"] - before == 10
    assert o2 == reference_greedy(engine, p2, 6)


def test_suspend_errors_name_the_problem(engine):
    with pytest.raises(EngineError, match="no cached context"):
        engine.suspend("nope")
    run_one(engine, Request("t1", [1, 2, 3], max_tokens=2, session_id="s"))
    with pytest.raises(EngineError, match="mode"):
        engine.suspend("s", "freeze")


def test_ttl_drops_suspended_context(engine):
    run_one(engine, Request("t1", [1, 2, 3, 4], max_tokens=2, session_id="s"))
    engine.suspend("s", "swap", ttl_s=0)
    engine.step()
    assert "s" not in engine.stats()["sessions"]
    assert engine.bm.num_free_host == engine.bm.host_blocks
