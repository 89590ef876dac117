"""Where a session's KV cache waits while its agent runs a tool call.

Pure. When a tool call starts, the agent's context sits idle on the GPU for
the call's expected duration D. Three choices, each a `suspend` mode of the
worker's control socket:

- keep: leave the blocks on the GPU (free, but they hold device memory);
- swap: copy them to pinned host memory and back at the end. The link time is
  t_swap = B / bw_d2h + B / bw_h2d (agentcg.worker.costmodel.CostModel, the
  same model the worker uses when it preempts);
- drop: free them; the next turn recomputes: t_recompute = tokens / prefill_rate.

The rules, in order (the first that applies decides):

1. D < keep_below_s                        -> keep (too short to bother)
2. pool free fraction >= pressure_free_fraction -> keep (no pressure)
3. D < payback_ratio * t_swap              -> keep (the swap would not pay)
4. host pool has room for B:
     low priority and t_recompute <= t_swap -> drop (cheaper to rebuild)
     otherwise                              -> swap
5. host pool full:
     low priority and D >= payback_ratio * t_recompute -> drop
     otherwise                              -> keep (the priority protects it)

"Pays" means the blocks are off the GPU for at least (payback_ratio - 1) times
as long as the link is busy moving them. At the call's end a swapped session
is resumed at once (prefetch), ahead of the agent's next request; a kept one is
resumed too, which only clears its keep mark; a dropped one has nothing left.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from agentcg.core.intents import PRIORITY_DEFAULT
from agentcg.worker.costmodel import CostModel

KEEP, SWAP, DROP = "keep", "swap", "drop"


@dataclass(frozen=True)
class PlacementConfig:
    keep_below_s: float = 1.0
    pressure_free_fraction: float = 0.25   # pool less free than this is under pressure
    payback_ratio: float = 4.0
    low_priority_max: int = PRIORITY_DEFAULT - 1   # priorities 1..4 may be dropped

    def __post_init__(self) -> None:
        if self.keep_below_s < 0:
            raise ValueError(f"keep_below_s: must not be negative, got {self.keep_below_s}")
        if not 0.0 <= self.pressure_free_fraction <= 1.0:
            raise ValueError(f"pressure_free_fraction: expected 0..1, got {self.pressure_free_fraction}")
        if self.payback_ratio < 1.0:
            raise ValueError(f"payback_ratio: expected >= 1, got {self.payback_ratio}")


@dataclass(frozen=True)
class PlacementInput:
    kv_bytes: int
    tokens: int
    expected_duration_s: float
    pool_free_fraction: float            # device KV pool: free blocks / online blocks
    host_free_bytes: int                 # pinned host pool: free bytes
    priority: int = PRIORITY_DEFAULT
    d2h_bytes_per_s: float = 25e9
    h2d_bytes_per_s: float = 25e9
    prefill_tokens_per_s: float = 1e4

    def __post_init__(self) -> None:
        for name in ("d2h_bytes_per_s", "h2d_bytes_per_s", "prefill_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.kv_bytes < 0 or self.tokens < 0 or self.host_free_bytes < 0:
            raise ValueError("kv_bytes, tokens and host_free_bytes must not be negative")
        if self.expected_duration_s < 0:
            raise ValueError(f"expected_duration_s: must not be negative, got {self.expected_duration_s}")

    @classmethod
    def from_worker_stats(cls, stats: Mapping[str, Any], session: str, *, expected_duration_s: float,
                          priority: int = PRIORITY_DEFAULT) -> "PlacementInput":
        """From the worker's `stats` reply (pools, cost_model, sessions)."""
        s = stats["sessions"][session]
        bb = int(stats["block_bytes"])
        online = max(1, int(stats["gpu_blocks_online"]))
        cm = stats.get("cost_model") or {}
        return cls(kv_bytes=(s["blocks_gpu"] + s["blocks_host"]) * bb, tokens=int(s["tokens"]),
                   expected_duration_s=expected_duration_s,
                   pool_free_fraction=int(stats["gpu_blocks_free"]) / online,
                   host_free_bytes=int(stats["host_blocks_free"]) * bb, priority=priority,
                   d2h_bytes_per_s=float(cm.get("d2h_gbps", 25.0)) * 1e9,
                   h2d_bytes_per_s=float(cm.get("h2d_gbps", 25.0)) * 1e9,
                   prefill_tokens_per_s=float(cm.get("prefill_tokens_per_s", 1e4)))


@dataclass(frozen=True)
class Placement:
    mode: str                          # keep | swap | drop: the worker's suspend mode
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EndAction:
    op: str | None                     # "resume" or None (nothing to do)
    reason: str


def costs(inp: PlacementInput) -> tuple[float, float]:
    """-> (t_swap_s, t_recompute_s) from the worker's cost model."""
    cm = CostModel(h2d_gbps=inp.h2d_bytes_per_s / 1e9, d2h_gbps=inp.d2h_bytes_per_s / 1e9,
                   prefill_tokens_per_s=inp.prefill_tokens_per_s)
    return cm.swap_s(inp.kv_bytes), cm.recompute_s(inp.tokens)


def place(inp: PlacementInput, cfg: PlacementConfig = PlacementConfig()) -> Placement:
    """The suspend mode for a session whose agent enters a tool call."""
    t_swap, t_rec = costs(inp)
    d = inp.expected_duration_s
    nums = {"expected_s": d, "swap_s": t_swap, "recompute_s": t_rec, "kv_bytes": float(inp.kv_bytes),
            "pool_free_fraction": inp.pool_free_fraction, "host_free_bytes": float(inp.host_free_bytes),
            "priority": float(inp.priority)}
    low = inp.priority <= cfg.low_priority_max
    ms = _ms

    def out(mode: str, why: str) -> Placement:
        return Placement(mode, why, nums)

    if d < cfg.keep_below_s:
        return out(KEEP, f"call expected to take {d:.1f} s < {cfg.keep_below_s:.1f} s: too short to move the context")
    if inp.pool_free_fraction >= cfg.pressure_free_fraction:
        return out(KEEP, f"KV pool {inp.pool_free_fraction:.0%} free >= {cfg.pressure_free_fraction:.0%}: "
                         "no pressure, the context stays on the GPU")
    if d < cfg.payback_ratio * t_swap:
        return out(KEEP, f"call expected {d:.1f} s < {cfg.payback_ratio:g} x swap {ms(t_swap)}: "
                         "the swap would not pay")
    if inp.host_free_bytes >= inp.kv_bytes:
        if low and t_rec <= t_swap:
            return out(DROP, f"priority {inp.priority} and recompute {ms(t_rec)} <= swap {ms(t_swap)}: "
                             "drop, the next turn rebuilds it")
        return out(SWAP, f"call expected {d:.1f} s >= {cfg.payback_ratio:g} x swap {ms(t_swap)}, KV pool "
                         f"{inp.pool_free_fraction:.0%} free: swap to host")
    if low and d >= cfg.payback_ratio * t_rec:
        return out(DROP, f"host pool full ({_mib(inp.host_free_bytes)} free < {_mib(inp.kv_bytes)}), priority "
                         f"{inp.priority}, call expected {d:.1f} s >= {cfg.payback_ratio:g} x recompute {ms(t_rec)}: drop")
    if low:
        return out(KEEP, f"host pool full and call expected {d:.1f} s < {cfg.payback_ratio:g} x recompute "
                         f"{ms(t_rec)}: keep")
    return out(KEEP, f"host pool full ({_mib(inp.host_free_bytes)} free < {_mib(inp.kv_bytes)}) and priority "
                     f"{inp.priority} > {cfg.low_priority_max} is not dropped: keep")


def on_call_end(mode: str) -> EndAction:
    """What to do with the session when its tool call ends."""
    if mode == SWAP:
        return EndAction("resume", "call ended: prefetch the swapped context back to the GPU now, "
                                   "ahead of the next request")
    if mode == KEEP:
        return EndAction("resume", "call ended: clear the keep mark (the context is on the GPU)")
    if mode == DROP:
        return EndAction(None, "call ended: the context was dropped; the next request recomputes it")
    raise ValueError(f"mode: expected keep, swap or drop, got {mode!r}")


def _ms(t_s: float) -> str:
    return f"{t_s * 1e3:.1f} ms"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
