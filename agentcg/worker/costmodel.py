"""Swap or recompute: the price of moving a context versus rebuilding it.

Both numbers are measured when the engine starts (pinned copy bandwidth of the
link, prefill throughput of the loaded model); the choice itself is pure.
"""
from __future__ import annotations

from dataclasses import dataclass

SWAP = "swap"
RECOMPUTE = "recompute"


@dataclass
class CostModel:
    h2d_gbps: float            # host -> device, 1e9 bytes/s
    d2h_gbps: float            # device -> host
    prefill_tokens_per_s: float
    force: str | None = None   # "swap" / "recompute" overrides the comparison

    def swap_s(self, nbytes: int) -> float:
        """Out now and back in later."""
        return nbytes / (self.d2h_gbps * 1e9) + nbytes / (self.h2d_gbps * 1e9)

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def choose(self, *, num_tokens: int, nbytes: int, host_has_room: bool) -> tuple[str, str]:
        """-> (mode, reason)."""
        if not host_has_room:
            return RECOMPUTE, "host pool full"
        if self.force in (SWAP, RECOMPUTE):
            return self.force, f"forced {self.force}"
        s, r = self.swap_s(nbytes), self.recompute_s(num_tokens)
        if s <= r:
            return SWAP, f"swap {s * 1e3:.2f} ms <= recompute {r * 1e3:.2f} ms"
        return RECOMPUTE, f"recompute {r * 1e3:.2f} ms < swap {s * 1e3:.2f} ms"

    def as_dict(self) -> dict:
        return {"h2d_gbps": round(self.h2d_gbps, 2), "d2h_gbps": round(self.d2h_gbps, 2),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1), "force": self.force}
