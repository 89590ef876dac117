"""The daemon-side worker adapter against the real tiny engine (CPU): the
stats it parses, a planned shrink and the grow back, suspend/resume of a
session that has a context."""
from __future__ import annotations

import asyncio

import openai

from agentcg.adapters.worker import WorkerAdapter, pool_from_stats
from agentcg.core.gpu_budget import (BudgetInput, GpuConfig, GpuDevice, GpuSnapshot, PendingCall, Shrink,
                                     loans_after, plan)
from agentcg.core.kv_placement import PlacementConfig, PlacementInput, on_call_end, place


def test_budget_shrink_and_grow_and_placement_on_the_real_engine(worker):
    client = openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60,
                           default_headers={"X-Agentcg-Session": "adapter-s1"})
    client.completions.create(model="tiny", prompt="the agent reads a file and " * 4, max_tokens=4, temperature=0)

    async def main():
        wa = WorkerAdapter(worker.socket_path, op_timeout_s=60, fast_timeout_s=60)
        try:
            stats = (await wa.stats()).result
            assert pool_from_stats(stats) is None                  # a CPU pool is not GPU memory
            pool = pool_from_stats(stats, device_index=0)
            assert pool.pool_bytes == stats["gpu_pool_bytes"] and 0 < pool.reclaimable_bytes < pool.pool_bytes
            # a GPU with nothing free: the call needs two chunks from the pool
            gpus = GpuSnapshot(devices=(GpuDevice(0, 8 * pool.pool_bytes, 8 * pool.pool_bytes, 0),))
            need = 2 * pool.chunk_bytes
            (d,) = plan(BudgetInput(gpus, pool, pending=(PendingCall("c1", "adapter-s1", need),)),
                        GpuConfig(headroom_bytes=0))
            assert isinstance(d, Shrink) and d.nbytes == need
            done, replies = await wa.apply_budget([d])
            assert replies[0].ok and done[0].nbytes == need
            after = (await wa.stats()).result
            assert after["gpu_pool_bytes"] == pool.pool_bytes - need
            assert after["sessions"]["adapter-s1"]["where"] == "gpu"   # it was reclaimable room, not this context
            loans = loans_after({}, done)
            grows = plan(BudgetInput(gpus, pool_from_stats(after, 0), ended=("c1",), loans=loans))
            done, _ = await wa.apply_budget(grows)
            assert loans_after(loans, done) == {}
            assert (await wa.stats()).result["gpu_pool_bytes"] == pool.pool_bytes
            # the placement for a long call under pressure, carried out and undone
            inp = PlacementInput.from_worker_stats(after, "adapter-s1", expected_duration_s=600.0)
            assert inp.kv_bytes > 0 and inp.tokens > 0
            p = place(inp, PlacementConfig(pressure_free_fraction=1.0))    # every pool "under pressure"
            assert p.mode == "swap", p.reason
            r = await wa.apply_placement("adapter-s1", p)
            assert r.ok and r.result["where"] == "host"
            r = await wa.apply_end("adapter-s1", on_call_end(p.mode))
            assert r.ok and r.result["where"] == "gpu"
        finally:
            wa.close()

    asyncio.run(main())
