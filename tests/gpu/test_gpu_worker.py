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


def test_gpu_swap_round_trip_bit_exact_and_fast():
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
    h = kv.swap_in("s", dst, [(0, 256, 0)])
    h.synchronize()
    after = torch.stack([kv.chunks[b // 256][:, b % 256] for b in dst])
    assert torch.equal(before, after)
    link = kv.measure_link_gbps(256 << 20)
    import time
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kv.swap_out("s", src, [(0, 256, 0)]).synchronize()
    gbps = 256 * kv.block_bytes / (time.perf_counter() - t0) / 1e9
    assert gbps > 0.3 * link["d2h_gbps"], (gbps, link)
