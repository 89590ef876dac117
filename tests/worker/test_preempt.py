"""A pool too small for all requests: preemption (swap and recompute) still
completes every request with the reference output; shrink/grow while running."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agentcg.worker.engine import Engine, EngineConfig, Request  # noqa: E402
from agentcg.worker.scheduler import StepPlan  # noqa: E402


def run_all(engine, limit=5000):
    out = {}
    for _ in range(limit):
        if not engine.has_work():
            break
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
        engine.bm.check()
    assert not engine.has_work()
    return out


_REF: dict = {}


def reference_greedy(engine, prompt, n):
    key = (tuple(prompt), n)
    if key not in _REF:
        toks = list(prompt)
        for _ in range(n):
            toks.append(int(engine.model.reference_forward(toks)[-1].argmax()))
        _REF[key] = toks[len(prompt):]
    return _REF[key]


PROMPTS = {f"r{i}": [(7 * i + j) % 250 for j in range(18 + 3 * i)] for i in range(4)}


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_small_pool_preempts_and_completes_correctly(mode):
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=8, chunk_blocks=4, host_blocks=32,
                            preempt_mode=mode, measure=False))
    for i, (rid, p) in enumerate(PROMPTS.items()):
        e.add_request(Request(rid, p, max_tokens=20, priority=i % 2))
    out = run_all(e)
    for rid, p in PROMPTS.items():
        assert out[rid] == reference_greedy(e, p, 20), rid
    st = e.stats()
    assert st["preemptions"][mode] > 0
    assert st["preemptions"]["swap" if mode == "recompute" else "recompute"] == 0
    if mode == "swap":
        assert st["swap"]["swap_out_count"] > 0 and st["swap"]["swap_in_count"] > 0
    assert e.bm.num_free_gpu == e.bm.num_online_gpu and e.bm.num_free_host == 32


def test_cost_model_picks_a_mode_and_says_why():
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=8, chunk_blocks=4, host_blocks=32))
    for rid, p in PROMPTS.items():
        e.add_request(Request(rid, p, max_tokens=20))
    out = run_all(e)
    assert all(len(v) == 20 for v in out.values())
    st = e.stats()
    assert sum(st["preemptions"].values()) > 0
    assert any("preempted" in line and " ms" in line for line in st["recent"])


def test_swap_out_and_in_mid_generation_gives_identical_tokens():
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=64, chunk_blocks=8, host_blocks=64,
                            measure=False))
    p = PROMPTS["r3"]
    e.add_request(Request("x", p, max_tokens=30))
    got = []
    for _ in range(6):
        got += [ev.token_id for ev in e.step()]
    seq = e.sched.seqs["x"]
    plan = StepPlan()
    e.cost.force = "swap"
    e.sched.preempt(seq, plan, "test")
    e._run_swaps(plan)
    assert seq.state == "swapped" and e.bm.table(seq.owner).where == "host"
    assert e.bm.num_free_gpu == e.bm.num_online_gpu
    got += run_all(e)["x"]
    assert got == reference_greedy(e, p, 30)
    assert e.sched.seqs == {} and e.stats()["swap"]["swap_in_count"] == 1


def test_shrink_then_grow_while_requests_run():
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=32, chunk_blocks=4, host_blocks=64,
                            measure=False))
    for rid, p in PROMPTS.items():
        e.add_request(Request(rid, p, max_tokens=20))
    out: dict = {}
    for _ in range(3):
        for ev in e.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    pool0 = e.kv.online_bytes()
    r = e.shrink(5 * e.kv.chunk_bytes)
    assert r["freed_bytes"] == 5 * e.kv.chunk_bytes and e.kv.online_bytes() == pool0 - r["freed_bytes"]
    assert sum(t is None for t in e.kv.chunks) == 5 and e.stats()["chunks_online"] == 3
    e.bm.check()
    for _ in range(4):
        for ev in e.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    g = e.grow(5 * e.kv.chunk_bytes)
    assert g["grown_bytes"] == 5 * e.kv.chunk_bytes and e.kv.online_bytes() == pool0
    for rid, toks in run_all(e).items():
        out.setdefault(rid, []).extend(toks)
    for rid, p in PROMPTS.items():
        assert out[rid] == reference_greedy(e, p, 20), rid


def test_shrink_keeps_one_chunk_and_rejects_negative():
    e = Engine(EngineConfig(model="tiny", device="cpu", gpu_blocks=16, chunk_blocks=4, measure=False))
    r = e.shrink(10 * e.kv.chunk_bytes)
    assert r["chunks"] == [1, 2, 3] and e.stats()["chunks_online"] == 1
    with pytest.raises(ValueError, match="nbytes"):
        e.shrink(-1)
