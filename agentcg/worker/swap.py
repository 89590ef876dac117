"""Swap engine: carries out the block manager's swap plans on the KV pool and
keeps the in-flight handles and the measured figures.

The copies themselves (gather into staging, one large transfer per piece on
a dedicated stream, scatter) are in agentcg/adapters/kv_torch.py.
"""
from __future__ import annotations

from typing import Callable

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
        # swap-ins issued as the forward pass asks for each layer; False: every
        # copy is queued when the swap-in is planned (kept to compare)
        self.lazy = True

    def run(self, plan: SwapPlan) -> SwapHandle:
        src = [m[1] for m in plan.moves]
        dst = [m[2] for m in plan.moves]
        if plan.direction == "out":
            h = self.kv.swap_out(plan.owner, src, list(plan.runs))
        else:
            # issued lazily: the next forward pass that runs this owner drives
            # the copies layer by layer (for_step issues them otherwise)
            h = self.kv.swap_in(plan.owner, dst, list(plan.runs), lazy=self.lazy)
            self.pending[plan.owner] = h
        self.bytes[plan.direction] += h.nbytes
        self.count[plan.direction] += 1
        self._inflight.append(h)
        return h

    def rename(self, old: str, new: str) -> None:
        if old in self.pending:
            h = self.pending.pop(old)
            h.owner = new
            self.pending[new] = h

    def waits_for(self, owner: str) -> SwapHandle | None:
        return self.pending.get(owner)

    def has_unissued(self) -> bool:
        return any(not h.fully_issued() for h in self.pending.values())

    def for_step(self, owners: set[str], holds: Callable[[str, list[int]], bool],
                 overlap: bool = True) -> list[SwapHandle]:
        """Swap-ins this step's forward pass must wait for, layer by layer.

        owners: the owners in this step's batch. holds(owner, blocks): whether
        the owner still holds those device blocks. A swap-in of an owner that
        does not run now is issued in full (a prefetch); if its owner let go of
        some of its blocks meanwhile, compute waits for all of it, since those
        blocks may be rewritten in this step. overlap=False: compute waits for
        every swap-in in full before the step (the serial arrangement)."""
        waits = []
        for owner, h in list(self.pending.items()):
            if owner in owners and overlap:
                waits.append(h)
            elif owner in owners:
                h.settle()
            else:
                h.issue_all()
                if not holds(owner, h.blocks):
                    h.settle()
        return waits

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
