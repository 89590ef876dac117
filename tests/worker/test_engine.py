"""Engine on CPU with the tiny model: paged greedy output equals the plain
reference forward without a cache."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agentcg.worker.engine import Engine, EngineConfig, EngineError, Request  # noqa: E402


def reference_greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(engine.model.reference_forward(toks)[-1].argmax()))
    return toks[len(prompt):]


def run_all(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(10000):
        if not engine.has_work():
            break
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    assert not engine.has_work()
    return out


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=256, measure=False))


def test_batched_greedy_matches_reference(engine):
    prompts = {"a": list(range(10, 45)), "b": [5, 6, 7], "c": list(range(100, 117))}
    for rid, p in prompts.items():
        engine.add_request(Request(rid, p, max_tokens=20 if rid != "b" else 30))
    out = run_all(engine)
    for rid, p in prompts.items():
        assert out[rid] == reference_greedy(engine, p, len(out[rid]))
        assert len(out[rid]) == (30 if rid == "b" else 20)
    engine.bm.check()
    assert engine.bm.num_free_gpu == engine.bm.num_online_gpu


def test_chunked_prefill_matches_reference():
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=64, max_step_tokens=13, measure=False))
    p = list(range(1, 60))
    e.add_request(Request("x", p, max_tokens=8))
    out = run_all(e)
    assert out["x"] == reference_greedy(e, p, 8)


def test_stop_token_and_abort(engine):
    p = [1, 2, 3, 4]
    first = reference_greedy(engine, p, 3)
    engine.add_request(Request("s", p, max_tokens=10, stop_token_ids=(first[2],)))
    engine.add_request(Request("ab", p, max_tokens=50))
    evs = engine.step()
    engine.abort("ab")
    got = [e.token_id for e in evs if e.request_id == "s"] + run_all(engine).get("s", [])
    assert got == first
    assert "ab" not in engine.stats()["requests"]
    assert engine.bm.num_free_gpu == engine.bm.num_online_gpu


def test_bad_requests_name_the_field(engine):
    with pytest.raises(EngineError, match="prompt_token_ids"):
        engine.add_request(Request("e1", [], max_tokens=4))
    with pytest.raises(EngineError, match="outside vocabulary"):
        engine.add_request(Request("e2", [10**6], max_tokens=4))
    with pytest.raises(EngineError, match="max_tokens"):
        engine.add_request(Request("e3", [1], max_tokens=0))


def test_tokenizer_round_trip(engine):
    tok = engine.tokenizer
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert "assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_engine_shares_a_loaded_model(engine):
    """A second engine over the first one's weights (no second load) gives the
    same greedy tokens from its own KV pool; a model in another dtype is refused."""
    other = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=64, measure=False), model=engine.model)
    assert other.model is engine.model
    prompt = [(7 * j) % 250 for j in range(40)]
    other.add_request(Request("shared", prompt, max_tokens=6))
    assert run_all(other)["shared"] == reference_greedy(engine, prompt, 6)
    with pytest.raises(EngineError, match="shared model"):
        Engine(EngineConfig(model="tiny", device="cpu", dtype="float64", gpu_blocks=64, measure=False),
               model=engine.model)


def test_suspend_ttl_runs_on_the_engine_clock():
    """A suspended context with ttl_s is dropped by the first step at or after
    its deadline on engine.clock, not before."""
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=64, measure=False))
    now = [100.0]
    e.clock = lambda: now[0]
    e.add_request(Request("t1", [(5 * j) % 250 for j in range(30)], max_tokens=3, session_id="s"))
    run_all(e)
    e.suspend("s", "keep", ttl_s=5.0)
    now[0] = 104.9
    e.step()
    assert "s" in e.stats()["sessions"]
    now[0] = 105.0
    e.step()
    assert "s" not in e.stats()["sessions"] and e.counters["dropped_sessions"] == 1
