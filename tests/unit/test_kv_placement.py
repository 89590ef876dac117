"""KV placement during a tool call: keep / swap / drop at each boundary."""
from __future__ import annotations

import pytest

from agentcg.core.kv_placement import (
    DROP, KEEP, SWAP, PlacementConfig, PlacementInput, costs, on_call_end, place,
)

KV = 10_000_000_000        # 10 GB at 10 GB/s each way: t_swap = 2.0 s exactly
CFG = PlacementConfig(keep_below_s=1.0, pressure_free_fraction=0.25, payback_ratio=4.0, low_priority_max=4)


def inp(d_s: float, *, free: float = 0.1, host: int = 2 * KV, prio: int = 5, tokens: int = 30_000) -> PlacementInput:
    # tokens 30000 at 1e4 tokens/s: t_recompute = 3.0 s
    return PlacementInput(kv_bytes=KV, tokens=tokens, expected_duration_s=d_s, pool_free_fraction=free,
                          host_free_bytes=host, priority=prio, d2h_bytes_per_s=10e9, h2d_bytes_per_s=10e9,
                          prefill_tokens_per_s=1e4)


def test_costs_come_from_the_worker_cost_model():
    assert costs(inp(10)) == (2.0, 3.0)


def test_short_call_keeps_at_the_keep_below_boundary():
    # with a cheap context (swap 0.2 s) only the keep_below rule holds it back
    cheap = PlacementInput(kv_bytes=KV // 10, tokens=100, expected_duration_s=0.999, pool_free_fraction=0.0,
                           host_free_bytes=KV, d2h_bytes_per_s=10e9, h2d_bytes_per_s=10e9)
    p = place(cheap, CFG)
    assert p.mode == KEEP and "too short" in p.reason
    assert place(PlacementInput(**{**cheap.__dict__, "expected_duration_s": 1.0}), CFG).mode == SWAP


def test_no_pressure_keeps_at_the_free_fraction_boundary():
    assert place(inp(100, free=0.25), CFG).mode == KEEP
    assert "no pressure" in place(inp(100, free=0.25), CFG).reason
    assert place(inp(100, free=0.2499), CFG).mode == SWAP


def test_swap_pays_from_payback_ratio_times_swap_time():
    p = place(inp(7.999), CFG)
    assert p.mode == KEEP and "would not pay" in p.reason and "2000.0 ms" in p.reason
    p = place(inp(8.0), CFG)
    assert p.mode == SWAP and p.numbers["swap_s"] == 2.0


def test_host_room_boundary_between_swap_and_keep_for_normal_priority():
    assert place(inp(100, host=KV), CFG).mode == SWAP
    p = place(inp(100, host=KV - 1), CFG)
    assert p.mode == KEEP and "priority 5 > 4 is not dropped" in p.reason


def test_host_full_low_priority_drops_when_recompute_pays():
    # t_recompute = 3 s: drop from 4 x 3 = 12 s
    assert place(inp(11.999, host=0, prio=4), CFG).mode == KEEP
    p = place(inp(12.0, host=0, prio=4), CFG)
    assert p.mode == DROP and "host pool full" in p.reason


def test_priority_boundary_for_drop():
    assert place(inp(100, host=0, prio=4), CFG).mode == DROP
    assert place(inp(100, host=0, prio=5), CFG).mode == KEEP


def test_low_priority_with_room_drops_only_when_recompute_is_not_dearer_than_swap():
    assert place(inp(100, prio=4, tokens=20_000), CFG).mode == DROP      # 2.0 s <= 2.0 s
    assert place(inp(100, prio=4, tokens=20_001), CFG).mode == SWAP
    assert place(inp(100, prio=5, tokens=1), CFG).mode == SWAP            # normal priority: never dropped


def test_call_end_resumes_swapped_and_kept_sessions_at_once():
    assert on_call_end(SWAP).op == "resume" and "prefetch" in on_call_end(SWAP).reason
    assert on_call_end(KEEP).op == "resume"
    assert on_call_end(DROP).op is None
    with pytest.raises(ValueError, match="mode"):
        on_call_end("later")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="h2d_bytes_per_s"):
        PlacementInput(kv_bytes=1, tokens=1, expected_duration_s=1, pool_free_fraction=0.1, host_free_bytes=0,
                       h2d_bytes_per_s=0)
    with pytest.raises(ValueError, match="payback_ratio"):
        PlacementConfig(payback_ratio=0.5)


def test_from_worker_stats_reads_the_stats_reply():
    stats = {"block_bytes": 1 << 20, "gpu_blocks_online": 100, "gpu_blocks_free": 10, "host_blocks_free": 50,
             "cost_model": {"h2d_gbps": 20.0, "d2h_gbps": 10.0, "prefill_tokens_per_s": 5000.0},
             "sessions": {"s1": {"tokens": 512, "blocks_gpu": 32, "blocks_host": 0, "where": "gpu"}}}
    p = PlacementInput.from_worker_stats(stats, "s1", expected_duration_s=30.0, priority=3)
    assert (p.kv_bytes, p.tokens, p.pool_free_fraction, p.host_free_bytes) == (32 << 20, 512, 0.1, 50 << 20)
    assert (p.d2h_bytes_per_s, p.h2d_bytes_per_s, p.prefill_tokens_per_s) == (10e9, 20e9, 5000.0)


def test_gpu_core_modules_import_no_torch_pynvml_or_io():
    import subprocess
    import sys
    code = ("import sys; import agentcg.core.gpu_budget, agentcg.core.kv_placement, agentcg.core.durations; "
            "print(sorted(m for m in ('torch', 'pynvml', 'socket', 'ctypes', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
