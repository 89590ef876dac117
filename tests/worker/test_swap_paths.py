"""KV gathers and swaps give the same bytes whether a plan's blocks form
consecutive runs (slice copies) or are scattered (indexed copies)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agentcg.adapters.kv_torch import KVPool  # noqa: E402


def make_pool(slot_blocks: int) -> KVPool:
    layer_block_bytes = 2 * 4 * 2 * 4 * 4          # 2 * bs * H * D * fp32
    kv = KVPool(n_layers=3, kv_heads=2, head_dim=4, block_size=4, chunk_blocks=8, num_chunks=4,
                host_blocks=40, device=torch.device("cpu"), dtype=torch.float32,
                slot_bytes=slot_blocks * layer_block_bytes)
    g = torch.Generator().manual_seed(3)
    for c in kv.chunks:
        c.normal_(generator=g)
    return kv


def stacked(kv: KVPool, blocks: list[int]) -> torch.Tensor:
    return torch.stack([torch.stack([kv.chunks[b // kv.cb][layer, b % kv.cb] for b in blocks])
                        for layer in range(kv.L)])


@pytest.mark.parametrize("slot_blocks", [5, 64])     # pieces within a layer / several layers per piece
def test_mixed_runs_gather_and_round_trip(slot_blocks):
    kv = make_pool(slot_blocks)
    src = [3, 4, 5, 6, 7, 8, 9, 10, 20, 2, 1, 30, 31]  # consecutive runs across chunks, and scattered ones
    plan = kv.gather_plan(src)
    assert any(s is not None for s in plan.spans) and any(s is None for s in plan.spans)
    ref = stacked(kv, src)
    assert torch.equal(torch.stack([kv.gather(layer, plan) for layer in range(kv.L)]), ref)
    runs = [(0, len(src), 0)]
    kv.swap_out("s", src, runs)
    dst = [11, 12, 13, 14, 15, 16, 17, 18, 0, 19, 21, 22, 23]
    kv.swap_in("s", dst, runs)
    assert torch.equal(stacked(kv, dst), ref)


def test_lazy_swap_in_copies_each_layer_when_it_is_waited_for():
    kv = make_pool(64)
    src = [3, 4, 5, 20, 2]
    ref = stacked(kv, src)
    runs = [(0, len(src), 0)]
    kv.swap_out("s", src, runs)
    dst = [11, 12, 13, 0, 19]
    h = kv.swap_in("s", dst, runs, lazy=True)
    assert [p.l1 - p.l0 for p in h.pieces] == [1] * kv.L          # one layer per piece
    assert torch.isnan(stacked(kv, dst)).all()                     # nothing has landed yet
    h.wait_layer(0)
    got = stacked(kv, dst)
    assert torch.equal(got[0], ref[0]) and torch.isnan(got[1:]).all()
    assert not h.is_done()
    h.wait_layer(1)
    assert torch.equal(stacked(kv, dst)[:2], ref[:2]) and torch.isnan(stacked(kv, dst)[2:]).all()
    h.issue_all()
    assert h.is_done() and torch.equal(stacked(kv, dst), ref)


def test_a_new_swap_issues_the_lazy_swap_in_first():
    """The host slots a pending swap-in reads are free in the block manager's
    eyes: a swap-out issued next may write them, so the swap-in goes first."""
    kv = make_pool(64)
    src, other = [3, 4, 5], [20, 21, 22]
    ref = stacked(kv, src)
    kv.swap_out("s", src, [(0, 3, 0)])
    h = kv.swap_in("s", [11, 12, 13], [(0, 3, 0)], lazy=True)
    kv.swap_out("o", other, [(0, 3, 0)])                            # same host slots
    assert h.is_done() and torch.equal(stacked(kv, [11, 12, 13]), ref)


def test_staging_made_during_a_forward_pass_serves_later_swaps():
    """A lazy swap-in's first copy may run inside the forward pass (inference
    mode); the staging buffer it makes is written again by swaps outside it."""
    kv = make_pool(64)
    h = kv.swap_in("s", [11, 12, 13], [(0, 3, 0)], lazy=True)
    with torch.inference_mode():
        h.issue_all()
    kv.swap_out("s", [11, 12, 13], [(3, 3, 0)])
    # the same bytes: host rows 0-2 were never written, and uninitialised memory
    # may hold NaN patterns, which compare unequal as floats
    assert torch.equal(kv.host_run(3, 3).view(torch.int32), kv.host_run(0, 3).view(torch.int32))
