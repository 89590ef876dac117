"""Detectors: rules that report who is short of memory (Findings) and plan no
writes. The memory ladder (ladder.py) acts on their findings."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy.base import Detector
from agentcg.core.policy.context import Ctx, Finding
from agentcg.core.policy.model import NS_PER_US, CgroupView, SessionView, fmt_ms
from agentcg.core.policy.registry import register


@register("psi_pressure")
@dataclass(frozen=True)
class PsiPressure(Detector):
    """Memory pressure from PSI: a session (or the host) stalled for more than
    stall_threshold_us within window_us, seen either as a fired PSI trigger
    (the kernel's own check) or from the growth of the stall total since the
    previous tick. scope: "sessions", "host" or "both". Ignored while host
    usage is below min_host_pct of a known budget (a call stalled at its own
    mark then just borrows).
    {name = "psi_pressure", args = {kind = "some", stall_threshold_us = 10000, window_us = 500000}}"""

    kind: str = "some"
    stall_threshold_us: int = 10_000
    window_us: int = 500_000
    scope: str = "sessions"
    min_host_pct: float = 80.0

    def check(self) -> str | None:
        if self.kind not in ("some", "full"):
            return f"kind: 'some' or 'full', got {self.kind!r}"
        if self.scope not in ("sessions", "host", "both"):
            return f"scope: 'sessions', 'host' or 'both', got {self.scope!r}"
        if self.window_us <= 0:
            return f"window_us: must be positive, got {self.window_us}"
        return None

    def stall_us(self, ctx: Ctx, cg: CgroupView) -> int:
        prev = ctx.state.psi_sample(cg.path)
        measured = 0 if prev is None else prev.stall_us(cg.psi, self.kind, ctx.now_ns, self.window_us * NS_PER_US)
        for trig in cg.triggers:
            if trig.kind == self.kind and trig.window_us <= self.window_us:
                measured = max(measured, trig.stall_us)
        return measured

    def evaluate(self, ctx: Ctx) -> None:
        host = ctx.snap.host
        if host.budget_bytes is not None and host.usage_bytes < host.budget_bytes * self.min_host_pct / 100:
            # stall while the host has room comes from a call's own mark, which
            # borrowing lifts; it is not pressure between sessions
            return
        targets: list[tuple[CgroupView, SessionView | None]] = []
        if self.scope in ("sessions", "both"):
            targets += [(s.cg, s) for s in ctx.snap.sessions]
        if self.scope in ("host", "both"):
            targets.append((ctx.snap.host.cg, None))
        for cg, sess in targets:
            stall = self.stall_us(ctx, cg)
            if stall > self.stall_threshold_us:
                prio = sess.priority if sess else max((s.priority for s in ctx.snap.sessions), default=0)
                ctx.findings.append(Finding(
                    self.rule_name, f"{fmt_ms(stall * NS_PER_US)}/{fmt_ms(self.window_us * NS_PER_US)}",
                    fmt_ms(self.stall_threshold_us * NS_PER_US),
                    session=sess.name if sess else None, priority=prio))
