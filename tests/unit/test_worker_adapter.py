"""Worker adapter against the worker's real ControlServer (no torch needed).

The server is agentcg.worker.control.ControlServer; the engine behind it is
a small pool with the worker's shrink/grow rules (whole chunks, one chunk
kept, refusals as ValueError), so the protocol, the framing and the error
mapping are the worker's own.
"""
from __future__ import annotations

import asyncio
import math
import os
import tempfile

import pytest

from agentcg.adapters.worker import DOWN, UP, WorkerAdapter, pool_from_stats
from agentcg.core.gpu_budget import Grow, Shrink, loans_after
from agentcg.core.kv_placement import Placement, on_call_end
from agentcg.worker.control import ControlServer

MiB = 1 << 20
CHUNK = 64 * MiB


class Pool:
    """The AsyncEngine surface ControlServer calls, over a chunked pool."""

    def __init__(self, chunks: int = 8):
        self.total = self.online = chunks
        self.calls: list[tuple] = []
        self.sessions = {"s1": "gpu"}

    async def stats(self):
        return {"device": "cuda:0", "block_bytes": MiB, "chunk_bytes": CHUNK, "chunks_online": self.online,
                "gpu_pool_bytes": self.online * CHUNK, "gpu_blocks_free": 100,
                "sessions": {"s1": {"blocks_gpu": 60, "keep": False}}, "requests": {}}

    async def suspend(self, session_id, mode, ttl_s):
        self.calls.append(("suspend", session_id, mode, ttl_s))
        if session_id not in self.sessions:
            raise KeyError(f"unknown session {session_id!r}")
        self.sessions[session_id] = mode
        return {"session": session_id, "where": "host" if mode == "swap" else "gpu"}

    async def resume(self, session_id):
        self.calls.append(("resume", session_id))
        return {"session": session_id, "swapped_in": self.sessions.get(session_id) == "swap"}

    async def shrink(self, nbytes):
        n = min(self.online - 1, math.ceil(nbytes / CHUNK))
        self.online -= max(0, n)
        return {"freed_bytes": max(0, n) * CHUNK, "pool_bytes": self.online * CHUNK}

    async def grow(self, nbytes):
        n = min(self.total - self.online, math.ceil(nbytes / CHUNK))
        self.online += n
        return {"grown_bytes": n * CHUNK, "pool_bytes": self.online * CHUNK}


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(dir="/tmp") as d:     # short: AF_UNIX paths are at most 107 bytes
        yield d


def run(coro):
    return asyncio.run(coro)


def test_placement_end_and_budget_ops_go_through_the_real_server(sock_dir):
    async def main():
        pool = Pool()
        srv = ControlServer(pool, os.path.join(sock_dir, "w.sock"))
        await srv.start()
        wa = WorkerAdapter(srv.path)
        try:
            assert (await wa.ping()).result == {"pong": True} and wa.state == UP
            r = await wa.apply_placement("s1", Placement("swap", "long call"), ttl_s=600)
            assert r.ok and r.result["where"] == "host"
            r = await wa.apply_end("s1", on_call_end("swap"))
            assert r.ok and r.result["swapped_in"] is True
            assert await wa.apply_end("s1", on_call_end("drop")) is None
            assert pool.calls == [("suspend", "s1", "swap", 600), ("resume", "s1")]
            # a shrink of 100M frees 2 whole chunks: the loan is what was freed
            done, replies = await wa.apply_budget([Shrink("c1", "r", 0, 100 * MiB)])
            assert [d.nbytes for d in done] == [2 * CHUNK] and pool.online == 6
            loans = loans_after({}, done)
            done, _ = await wa.apply_budget([Grow("c1", "r", loans["c1"])])
            assert pool.online == 8 and loans_after(loans, done) == {}
            # the engine's refusal comes back as a reply, and the worker stays up
            r = await wa.suspend("nobody", "swap")
            assert (r.ok, r.code, wa.state) == (False, "refused", UP) and "unknown session" in r.message
            p = await wa.pool()
            assert (p.device_index, p.pool_bytes, p.chunk_bytes) == (0, 8 * CHUNK, CHUNK)
            # 100 free + 60 idle blocks of 1M = 160M -> 2 whole chunks
            assert p.reclaimable_bytes == 2 * CHUNK
        finally:
            wa.close()
            await srv.close()
    run(main())


def test_absent_worker_is_down_with_the_reason_and_retried_later(sock_dir):
    now = [100.0]

    async def main():
        path = os.path.join(sock_dir, "none.sock")
        wa = WorkerAdapter(path, retry_s=5.0, clock=lambda: now[0])
        r = await wa.stats()
        assert not r.ok and r.code == "unavailable" and wa.state == DOWN and "no such file" in wa.reason
        # within retry_s: answered at once, not tried
        r = await wa.shrink(CHUNK)
        assert (r.ok, r.code) == (False, "absent") and "worker absent" in r.message
        done, replies = await wa.apply_budget([Shrink("c1", "r", 0, CHUNK)])
        assert done == [] and replies[0].code == "absent"
        # the worker comes up; after retry_s the adapter finds it
        srv = ControlServer(Pool(), path)
        await srv.start()
        try:
            assert (await wa.ping()).code == "absent"
            now[0] += 5.0
            assert (await wa.ping()).ok and wa.available
        finally:
            wa.close()
            await srv.close()
    run(main())


def test_a_worker_that_does_not_answer_times_out(sock_dir):
    async def main():
        path = os.path.join(sock_dir, "mute.sock")
        seen = asyncio.Event()

        async def mute(reader, writer):
            await reader.readline()
            seen.set()
            await asyncio.sleep(30)

        server = await asyncio.start_unix_server(mute, path=path)
        wa = WorkerAdapter(path, fast_timeout_s=0.2)
        try:
            r = await wa.stats()
            assert seen.is_set()
            assert not r.ok and r.code == "unavailable" and "timed out" in r.message and wa.state == DOWN
        finally:
            wa.close()
            server.close()
    run(main())


def test_pool_from_stats_rules():
    base = {"device": "cuda:1", "block_bytes": MiB, "chunk_bytes": CHUNK, "chunks_online": 2,
            "gpu_pool_bytes": 2 * CHUNK, "gpu_blocks_free": 10,
            "sessions": {"busy": {"blocks_gpu": 500}, "kept": {"blocks_gpu": 500, "keep": True},
                         "idle": {"blocks_gpu": 60}},
            "requests": {"r1": {"session": "busy", "state": "running"}}}
    p = pool_from_stats(base)
    # busy and keep-marked sessions are not reclaimable; 70M -> 1 chunk, and the last chunk stays
    assert (p.device_index, p.reclaimable_bytes) == (1, CHUNK)
    assert pool_from_stats({**base, "chunks_online": 1}).reclaimable_bytes == 0
    assert pool_from_stats({**base, "device": "cpu"}) is None
    assert pool_from_stats({**base, "device": "cpu"}, device_index=3).device_index == 3
