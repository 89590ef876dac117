"""The daemon's side of the inference worker's control socket, for asyncio.

Turns the core's decisions into control ops: a `Placement` into `suspend`
(keep/swap/drop), an `EndAction` into `resume`, the budget's `Shrink`/`Grow`
into `shrink`/`grow`; and the worker's `stats` into the `WorkerPool` the
budget planner reads. It speaks through agentcg.worker.control.WorkerControl
(stdlib only) in a thread, so a slow worker never blocks the daemon's loop.

Every op has a timeout (the socket's: `fast_timeout_s` for ping/stats,
`op_timeout_s` for the KV ops, which move memory). Nothing raises for the
worker's sake: each call returns a `WorkerReply`. A worker that is not there
(no socket, refused, timed out) puts the adapter in the "down" state with the
reason; while down, calls answer at once without touching the socket until
`retry_s` has passed, then the next call tries again.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from agentcg.core.gpu_budget import Decision, Grow, Shrink, WorkerPool
from agentcg.core.kv_placement import EndAction, Placement
from agentcg.worker.control import DEFAULT_SOCKET_PATH, ControlError, WorkerControl

UNKNOWN, UP, DOWN = "unknown", "up", "down"


@dataclass(frozen=True)
class WorkerReply:
    op: str
    ok: bool
    result: Any = None
    code: str = ""         # "" when ok; "absent" when not tried; else the worker's or transport's code
    message: str = ""


class WorkerAdapter:
    def __init__(self, path: str = DEFAULT_SOCKET_PATH, *, fast_timeout_s: float = 2.0,
                 op_timeout_s: float = 30.0, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = str(path)
        self.retry_s = retry_s
        self._clock = clock
        # two connections so that a long shrink does not hold up a stats read
        self._fast = WorkerControl(path, timeout_s=fast_timeout_s)
        self._slow = WorkerControl(path, timeout_s=op_timeout_s)
        self._locks = {id(self._fast): asyncio.Lock(), id(self._slow): asyncio.Lock()}
        self.state = UNKNOWN
        self.reason = "not contacted yet"
        self._down_at = 0.0

    @property
    def available(self) -> bool:
        return self.state == UP

    def close(self) -> None:
        self._fast.close()
        self._slow.close()

    async def _call(self, wc: WorkerControl, op: str, **fields: Any) -> WorkerReply:
        if self.state == DOWN and self._clock() - self._down_at < self.retry_s:
            return WorkerReply(op, False, code="absent", message=f"worker absent: {self.reason}")
        async with self._locks[id(wc)]:
            try:
                result = await asyncio.to_thread(wc.call, op, **fields)
            except ControlError as e:
                if e.code in ("unavailable", "bad_reply"):
                    self.state, self.reason, self._down_at = DOWN, e.message, self._clock()
                else:
                    self.state, self.reason = UP, "answering"   # it answered: it refused this op
                return WorkerReply(op, False, code=e.code, message=e.message)
        self.state, self.reason = UP, "answering"
        return WorkerReply(op, True, result)

    # the ops
    async def ping(self) -> WorkerReply:
        return await self._call(self._fast, "ping")

    async def stats(self) -> WorkerReply:
        return await self._call(self._fast, "stats")

    async def suspend(self, session: str, mode: str, ttl_s: float | None = None) -> WorkerReply:
        return await self._call(self._slow, "suspend", session=session, mode=mode, ttl_s=ttl_s)

    async def resume(self, session: str) -> WorkerReply:
        return await self._call(self._slow, "resume", session=session)

    async def shrink(self, nbytes: int) -> WorkerReply:
        return await self._call(self._slow, "shrink", bytes=int(nbytes))

    async def grow(self, nbytes: int) -> WorkerReply:
        return await self._call(self._slow, "grow", bytes=int(nbytes))

    # the core's decisions
    async def apply_placement(self, session: str, placement: Placement, ttl_s: float | None = None) -> WorkerReply:
        return await self.suspend(session, placement.mode, ttl_s)

    async def apply_end(self, session: str, action: EndAction) -> WorkerReply | None:
        return await self.resume(session) if action.op == "resume" else None

    async def apply_budget(self, decisions: Iterable[Decision]) -> tuple[list[Decision], list[WorkerReply]]:
        """Carry out the Shrink/Grow decisions, in order. -> (the ones done, as
        they took effect: a shrink frees whole chunks, so its nbytes is what the
        worker freed; feed them to gpu_budget.loans_after), every reply)."""
        done: list[Decision] = []
        replies: list[WorkerReply] = []
        for d in decisions:
            if isinstance(d, Shrink):
                r = await self.shrink(d.nbytes)
                if r.ok and r.result.get("freed_bytes", 0) > 0:
                    done.append(replace(d, nbytes=int(r.result["freed_bytes"])))
            elif isinstance(d, Grow):
                r = await self.grow(d.nbytes)
                if r.ok:
                    done.append(d)
            else:
                continue
            replies.append(r)
        return done, replies

    async def pool(self, device_index: int | None = None) -> WorkerPool | None:
        r = await self.stats()
        return pool_from_stats(r.result, device_index) if r.ok else None


def _device_index(device: str) -> int | None:
    """"cuda:1" -> 1, "cuda" -> 0, "cpu" -> None (not GPU memory)."""
    kind, _, idx = str(device).partition(":")
    if kind != "cuda":
        return None
    return int(idx) if idx.isdigit() else 0


def pool_from_stats(stats: Mapping[str, Any], device_index: int | None = None) -> WorkerPool | None:
    """The worker's `stats` reply -> its device KV pool, or None on a CPU worker.

    device_index: the pool's NVML device index when it is not the worker's
    CUDA index (CUDA_VISIBLE_DEVICES renumbers devices inside the worker).

    Reclaimable: free device blocks plus the device blocks of sessions that no
    request is using and that are not marked keep, rounded down to whole
    chunks, and never the last chunk (the worker keeps one)."""
    dev = _device_index(stats.get("device", "")) if device_index is None else device_index
    if dev is None:
        return None
    block_bytes = int(stats["block_bytes"])
    chunk_bytes = int(stats["chunk_bytes"])
    busy = {r.get("session") for r in stats.get("requests", {}).values()}
    idle_blocks = sum(s.get("blocks_gpu", 0) for sid, s in stats.get("sessions", {}).items()
                      if sid not in busy and not s.get("keep"))
    reclaim = (int(stats["gpu_blocks_free"]) + idle_blocks) * block_bytes
    reclaim = min(reclaim // chunk_bytes, max(0, int(stats["chunks_online"]) - 1)) * chunk_bytes
    return WorkerPool(dev, int(stats["gpu_pool_bytes"]), reclaim, chunk_bytes)
