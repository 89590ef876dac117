"""Swap engine: carries out the block manager's swap plans on the KV pool and
keeps the in-flight handles and the measured figures.

The copies themselves (gather into staging, one large transfer per piece on
a dedicated stream, scatter) are in agentcg/adapters/kv_torch.py.
"""
from __future__ import annotations

from agentcg.adapters.kv_torch import KVPool, SwapHandle
from agentcg.core.kv_blocks import SwapPlan


class SwapEngine:
    def __init__(self, kv: KVPool) -> None:
        self.kv = kv
        self.pending: dict[str, SwapHandle] = {}      # owner -> last swap-in in flight
        self.bytes = {"out": 0, "in": 0}
        self.count = {"out": 0, "in": 0}
        self.seconds = {"out": 0.0, "in": 0.0}
        self._inflight: list[SwapHandle] = []

    def run(self, plan: SwapPlan) -> SwapHandle:
        src = [m[1] for m in plan.moves]
        dst = [m[2] for m in plan.moves]
        if plan.direction == "out":
            h = self.kv.swap_out(plan.owner, src, list(plan.runs))
        else:
            h = self.kv.swap_in(plan.owner, dst, list(plan.runs))
            self.pending[plan.owner] = h
        self.bytes[plan.direction] += h.nbytes
        self.count[plan.direction] += 1
        self._inflight.append(h)
        return h

    def rename(self, old: str, new: str) -> None:
        if old in self.pending:
            self.pending[new] = self.pending.pop(old)

    def waits_for(self, owner: str) -> SwapHandle | None:
        return self.pending.get(owner)

    def poll(self) -> None:
        """Drop finished handles; account their link time."""
        still = []
        for h in self._inflight:
            if h.is_done():
                s = h.seconds()
                if s is not None:
                    self.seconds[h.direction] += s
                if self.pending.get(h.owner) is h:
                    del self.pending[h.owner]
            else:
                still.append(h)
        self._inflight = still

    def synchronize(self) -> None:
        for h in self._inflight:
            h.synchronize()
        self.poll()

    def stats(self) -> dict:
        out = {}
        for d in ("out", "in"):
            s = self.seconds[d]
            out[f"swap_{d}_count"] = self.count[d]
            out[f"swap_{d}_bytes"] = self.bytes[d]
            out[f"swap_{d}_gbps"] = round(self.bytes[d] / s / 1e9, 2) if s > 0 else None
        out["in_flight"] = len(self._inflight)
        return out
