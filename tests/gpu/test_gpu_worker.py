"""The worker on a CUDA GPU: paged greedy output equals the reference, swap
round trips are bit-exact, swap bandwidth is in the range of a pinned copy."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU available", allow_module_level=True)

from agentcg.adapters.kv_torch import KVPool  # noqa: E402
from agentcg.worker.engine import Engine, EngineConfig, Request  # noqa: E402


def run_all(engine):
    out = {}
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    return out


def reference_greedy(engine, prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(engine.model.reference_forward(toks)[-1].argmax()))
    return toks[len(prompt):]


def test_gpu_greedy_and_preempting_swap_match_reference():
    e = Engine(EngineConfig(model="tiny", device="cuda", dtype="fp32", gpu_blocks=8, chunk_blocks=4,
                            host_blocks=64, preempt_mode="swap"))
    prompts = {f"r{i}": [(7 * i + j) % 250 for j in range(20 + i)] for i in range(4)}
    for rid, p in prompts.items():
        e.add_request(Request(rid, p, max_tokens=24))
    out = run_all(e)
    for rid, p in prompts.items():
        assert out[rid] == reference_greedy(e, p, 24), rid
    assert e.stats()["preemptions"]["swap"] > 0
    e.bm.check()


def swapped_out_pool():
    """A bf16 pool whose 256 even blocks were swapped out (and zeroed): (pool,
    source blocks, destination blocks for the swap-in, their data before)."""
    kv = KVPool(n_layers=8, kv_heads=8, head_dim=128, block_size=16, chunk_blocks=256, num_chunks=2,
                host_blocks=256, device=torch.device("cuda"), dtype=torch.bfloat16, slot_bytes=16 << 20)
    for c in kv.chunks:
        c.normal_()
    src = list(range(0, 512, 2))[:256]
    dst = list(range(1, 512, 2))[:256]
    before = torch.stack([kv.chunks[b // 256][:, b % 256] for b in src])
    kv.swap_out("s", src, [(0, 256, 0)]).synchronize()
    for b in src:
        kv.chunks[b // 256][:, b % 256].zero_()
    return kv, src, dst, before


def blocks_of(kv, blocks):
    return torch.stack([kv.chunks[b // 256][:, b % 256] for b in blocks])


def test_gpu_swap_round_trip_bit_exact_and_fast():
    kv, src, dst, before = swapped_out_pool()
    h = kv.swap_in("s", dst, [(0, 256, 0)])
    h.synchronize()
    assert torch.equal(before, blocks_of(kv, dst))
    link = kv.measure_link_gbps(256 << 20)
    import time
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kv.swap_out("s", src, [(0, 256, 0)]).synchronize()
    gbps = 256 * kv.block_bytes / (time.perf_counter() - t0) / 1e9
    assert gbps > 0.3 * link["d2h_gbps"], (gbps, link)


def two_turns(e, pause):
    """Session turn 1, pause (none | swap | swap+resume), turn 2: turn 2's tokens."""
    p1 = [(5 * j + 3) % 250 for j in range(300)]
    e.add_request(Request("t1", p1, max_tokens=6, session_id="s"))
    o1 = run_all(e)["t1"]
    if pause != "none":
        assert e.suspend("s", "swap")["where"] == "host"
        e.swapper.synchronize()
        if pause.endswith("resume"):
            assert e.resume("s")["swapped_in"] is True
    e.add_request(Request("t2", p1 + o1 + [11, 12, 13, 14], max_tokens=8, session_id="s"))
    return run_all(e)["t2"]


@pytest.mark.parametrize("pause", ["swap", "swap+resume"])
def test_gpu_overlapped_resume_matches_no_swap_and_serial_swap_in(pause):
    def engine(**kw):
        return Engine(EngineConfig(model="small", device="cuda", dtype="fp32", gpu_blocks=128, chunk_blocks=16,
                                   host_blocks=128, measure=False, **kw))

    e = engine()
    overlapped = two_turns(e, pause)
    assert e.stats()["swap"]["swap_in_count"] == 1
    assert overlapped == two_turns(engine(), "none") == two_turns(engine(overlap_swap_in=False), pause)
    e.bm.check()


def test_gpu_lazy_swap_in_issues_layers_on_demand_and_lands_bit_exact():
    kv, _, dst, before = swapped_out_pool()
    h = kv.swap_in("s", dst, [(0, 256, 0)], lazy=True)
    assert h.issued == 0 and not h.is_done()
    h.wait_layer(0)                    # issues layers 0..lookahead, compute waits for layer 0 only
    issued_layers = {p.l0 for p in h.pieces[:h.issued]}
    assert issued_layers == set(range(kv.lookahead + 1))
    assert h.layer_ready[0] is not None and h.layer_ready[kv.L - 1] is None
    layer0 = torch.stack([kv.chunks[b // 256][0, b % 256] for b in dst])    # on the compute stream
    assert torch.equal(layer0, before[:, 0])
    h.synchronize()
    assert torch.equal(before, blocks_of(kv, dst))
    assert h.seconds() is not None and h.seconds() > 0
