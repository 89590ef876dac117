"""The worker on a CUDA GPU: paged greedy output equals the reference, swap
round trips are bit-exact, swap bandwidth is in the range of a pinned copy, a
resume from swap overlaps its copies layer by layer with the prefill and gives
the tokens of a run that never swapped."""
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


def swapped_out_pool(slot_bytes=16 << 20):
    """A bf16 pool whose 256 even blocks were swapped out (and zeroed): (pool,
    source blocks, destination blocks for the swap-in, their data before).
    One layer of the 256 blocks is 16 MiB: one piece per layer at the default
    slot_bytes, several below it."""
    kv = KVPool(n_layers=8, kv_heads=8, head_dim=128, block_size=16, chunk_blocks=256, num_chunks=2,
                host_blocks=256, device=torch.device("cuda"), dtype=torch.bfloat16, slot_bytes=slot_bytes)
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


def two_turns(e, pause, before_turn2=None):
    """Session turn 1, pause (none | swap | swap+resume), turn 2: turn 2's tokens.
    before_turn2(e): called after the swap-out, before resume() and turn 2."""
    p1 = [(5 * j + 3) % 250 for j in range(300)]
    e.add_request(Request("t1", p1, max_tokens=6, session_id="s"))
    o1 = run_all(e)["t1"]
    if pause != "none":
        assert e.suspend("s", "swap")["where"] == "host"
        e.swapper.synchronize()
    if before_turn2:
        before_turn2(e)
    if pause.endswith("resume"):
        assert e.resume("s")["swapped_in"] is True
    e.add_request(Request("t2", p1 + o1 + [11, 12, 13, 14], max_tokens=8, session_id="s"))
    return run_all(e)["t2"]


def engine(**kw):
    return Engine(EngineConfig(model="small", device="cuda", dtype="fp32", gpu_blocks=128, chunk_blocks=16,
                               host_blocks=128, measure=False, **kw))


@pytest.mark.parametrize("pause", ["swap", "swap+resume"])
def test_gpu_overlapped_resume_matches_no_swap_and_serial_swap_in(pause):
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


@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize("pause", ["swap", "swap+resume"])
def test_gpu_resume_issues_each_layer_before_its_attention_and_ahead_of_it_only_by_the_lookahead(pause, lazy):
    """Issue order on the host, from the pool's trace: layer l's copies are
    issued (and its event recorded) before its first write or read; lazily,
    layer l + lookahead + 1 only after layer l's attention has read its KV;
    eagerly (SwapEngine.lazy=False, the arrangement before), every layer before
    the prefill. Both give the tokens of a run that never swapped."""
    e = engine()
    e.swapper.lazy = lazy
    L, ahead = e.model.shape.n_layers, e.kv.lookahead
    assert ahead + 1 < L

    def start_trace(e):
        e.kv.trace = []

    toks = two_turns(e, pause, start_trace)
    trace = e.kv.trace
    ready = [trace.index(("ready", layer)) for layer in range(L)]
    assert sum(x[0] == "ready" for x in trace) == L
    for layer in range(L):
        assert ready[layer] < min(trace.index(("write", layer)), trace.index(("read", layer))), trace
    first_use = min(i for i, x in enumerate(trace) if x[0] in ("read", "write"))
    if lazy:
        for layer in range(L - ahead - 1):
            assert trace.index(("read", layer)) < ready[layer + ahead + 1], trace
    else:
        assert max(ready) < first_use, trace
    assert toks == two_turns(engine(), "none")


def test_gpu_lazy_swap_in_with_several_pieces_per_layer_is_in_place_layer_by_layer():
    """A layer larger than a staging slot goes in several pieces: layer l's
    event is the last of them, and compute that waits for it reads the whole
    layer, while later layers are still being issued or copied."""
    kv, _, dst, before = swapped_out_pool(slot_bytes=4 << 20)
    h = kv.swap_in("s", dst, [(0, 256, 0)], lazy=True)
    assert len(h.pieces) == 4 * kv.L and all(p.l1 - p.l0 == 1 for p in h.pieces)
    for layer in range(kv.L):
        h.wait_layer(layer)
        through = min(kv.L - 1, layer + kv.lookahead)
        assert h.issued == 4 * (through + 1)            # whole layers, none past the lookahead
        assert h.layer_ready[layer] is not None
        assert all(r is None for r in h.layer_ready[through + 1:])
        got = torch.stack([kv.chunks[b // 256][layer, b % 256] for b in dst])   # on the compute stream
        assert torch.equal(got, before[:, layer]), layer
    h.synchronize()
    assert h.is_done() and torch.equal(before, blocks_of(kv, dst))
