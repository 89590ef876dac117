"""CPU rules: weights and quotas from the declared CPU class, and the boost of
the call an agent is blocked on. Planned on every tick."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy.base import Action
from agentcg.core.policy.context import Ctx
from agentcg.core.policy.model import CgroupView, Reason
from agentcg.core.policy.registry import register


@register("cpu_classes")
@dataclass(frozen=True)
class CpuClasses(Action):
    """CPU classes from the intent: "latency" sessions and calls get
    cpu.weight = latency_weight; "batch" ones get batch_weight and, when
    batch_max_pct > 0, a cpu.max quota of that share of one CPU.
    {name = "cpu_classes", args = {latency_weight = 200, batch_weight = 25, batch_max_pct = 0}}"""

    latency_weight: int = 200
    batch_weight: int = 25
    batch_max_pct: int = 0

    def check(self) -> str | None:
        for f in ("latency_weight", "batch_weight"):
            v = getattr(self, f)
            if not 1 <= v <= 10000:
                return f"{f}: cpu.weight is 1..10000, got {v}"
        return None

    def _apply(self, ctx: Ctx, cg: CgroupView, cls: str | None, session: str) -> None:
        if cls == "latency":
            ctx.set(cg, "cpu.weight", self.latency_weight, Reason(self.rule_name, "class latency", op="",
                                                                  threshold=""), session)
        elif cls == "batch":
            ctx.set(cg, "cpu.weight", self.batch_weight, Reason(self.rule_name, "class batch", op="",
                                                                threshold=""), session)
            if self.batch_max_pct:
                quota = max(1000, self.batch_max_pct * 1000)
                ctx.set(cg, "cpu.max", f"{quota} 100000", Reason(self.rule_name, "class batch", op="",
                                                                  threshold=""), session)

    def evaluate(self, ctx: Ctx) -> None:
        for sess in ctx.snap.sessions:
            self._apply(ctx, sess.cg, sess.cpu_class, sess.name)
            for call in sess.calls:
                self._apply(ctx, call.cg, call.cpu_class or sess.cpu_class, sess.name)


@register("boost_blocking")
@dataclass(frozen=True)
class BoostBlocking(Action):
    """The tool call an agent is blocked on runs with cpu.weight = boost_weight
    (unless it is a batch call); calls running in the background keep the
    default weight.
    {name = "boost_blocking", args = {boost_weight = 400}}"""

    boost_weight: int = 400

    def evaluate(self, ctx: Ctx) -> None:
        for sess in ctx.snap.sessions:
            for call in sess.calls:
                if call.blocking and (call.cpu_class or sess.cpu_class) != "batch":
                    ctx.set(call.cg, "cpu.weight", self.boost_weight, Reason(
                        self.rule_name, "agent waits for this call", op="", threshold=""), sess.name)
