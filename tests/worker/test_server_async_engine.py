"""AsyncEngine: the engine thread and its asyncio bridge, with the real tiny engine (CPU)."""
from __future__ import annotations

import asyncio
import threading

import pytest
from worker_harness import direct_generate, engine_config

from agentcg.worker.async_engine import AsyncEngine, EngineClosed, GenerationFailed
from agentcg.worker.engine import Engine, EngineError, Request


@pytest.fixture
def aeng():
    a = AsyncEngine(Engine(engine_config(measure=False))).start()
    yield a
    a.close()


def req(rid, ids, n=8, session=None):
    return Request(request_id=rid, prompt_token_ids=ids, max_tokens=n, session_id=session, temperature=0.0)


def test_concurrent_generations_equal_direct_runs_and_engine_calls_stay_on_one_thread(aeng):
    ref = Engine(engine_config(measure=False))
    prompts = [[256] + list(f"prompt number {i}".encode()) for i in range(5)]
    want = [direct_generate(ref, p, 12)[0] for p in prompts]

    threads = set()
    real_step = aeng.engine.step

    def step():
        threads.add(threading.get_ident())
        return real_step()

    aeng.engine.step = step

    async def one(i):
        return [ev.token_id async for ev in aeng.generate(req(f"r{i}", prompts[i], 12))]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(5)))

    got = asyncio.run(main())
    assert got == want
    assert threads == {aeng._thread.ident}
    st = asyncio.run(aeng.stats())
    assert st["api"] == {"requests": 5, "finished": 5, "aborted": 0, "failed": 0, "running": 0}


def test_engine_errors_reach_the_caller(aeng):
    async def bad():
        async for _ in aeng.generate(req("bad", [999999])):
            pass

    with pytest.raises(EngineError, match="outside vocabulary"):
        asyncio.run(bad())
    with pytest.raises(EngineError, match="no cached context"):
        asyncio.run(aeng.suspend("nobody"))
    # the engine thread is still serving
    assert "gpu_blocks_free" in asyncio.run(aeng.stats())


def test_a_failing_step_fails_running_requests_and_frees_their_blocks(aeng):
    free0 = asyncio.run(aeng.stats())["gpu_blocks_free"]
    real_step = aeng.engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell off the bus")
        return real_step()

    aeng.engine.step = flaky

    async def run():
        return [ev async for ev in aeng.generate(req("x", [256, 1, 2, 3], 50))]

    with pytest.raises(GenerationFailed, match="device fell off the bus"):
        asyncio.run(run())
    st = asyncio.run(aeng.stats())
    assert st["api"]["failed"] == 1 and st["gpu_blocks_free"] == free0
    aeng.engine.step = real_step
    out = asyncio.run(run())           # and later requests work
    assert out[-1].finished


def test_leaving_early_aborts_and_close_ends_running_requests(aeng):
    free0 = asyncio.run(aeng.stats())["gpu_blocks_free"]

    async def first_two():
        out = []
        async for ev in aeng.generate(req("early", [256, 9, 9, 9], 200)):
            out.append(ev)
            if len(out) == 2:
                break
        return out

    assert len(asyncio.run(first_two())) == 2
    st = asyncio.run(aeng.stats())
    assert st["api"]["aborted"] == 1 and st["gpu_blocks_free"] == free0

    async def until_closed():
        n = 0
        async for _ in aeng.generate(req("long", [256, 7, 7], 400)):
            n += 1
            if n == 1:
                threading.Thread(target=aeng.close).start()
        return n

    with pytest.raises(EngineClosed):
        asyncio.run(until_closed())
    with pytest.raises(EngineClosed):
        asyncio.run(aeng.stats())
