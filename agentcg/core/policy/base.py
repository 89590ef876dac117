"""The three kinds of rule, as typed bases. A rule is a frozen dataclass that
subclasses one of them and is registered by name (registry.register).

- Detector: answers "is someone short of memory now?" by adding Findings
  to the context; it plans no writes.
- Action: plans writes every tick, whatever the pressure (grants, caps, CPU
  weights, baselines). It may report findings too (burst_borrow reports
  what a grant could not be backed by).
- LadderStep: one step of the memory ladder (planner.py). It runs only
  while there is pressure, once the step below has been in force for this
  step's escalate_after_ns, and is undone from the top once the pressure is
  gone. LastResort is the top step: it acts at most once per
  escalate_after_ns, and its guard (the host at its budget) acts at any level.

The planner tells the kinds apart by these classes, never by rule names.
"""
from __future__ import annotations

from typing import ClassVar

from agentcg.core.policy.context import Ctx


class RuleBase:
    """Common surface of every rule: its registered name and its argument check."""

    rule_name: ClassVar[str] = ""

    def check(self) -> str | None:
        """"field: problem" when the arguments cannot be used, else None."""
        return None


class Detector(RuleBase):
    """Reports findings (ctx.findings); plans no writes."""

    def evaluate(self, ctx: Ctx) -> None:
        raise NotImplementedError


class Action(RuleBase):
    """Plans writes (ctx.set, ctx.kill) on every tick, outside the ladder."""

    def evaluate(self, ctx: Ctx) -> None:
        raise NotImplementedError


class LadderStep(RuleBase):
    """One step of the memory ladder. `step` orders the steps (1 = first
    taken); `escalate_after_ns` is how long the step below must have been in
    force, without relieving the pressure, before this one is taken (a
    subclass that makes it a config argument declares it as a field)."""

    step: ClassVar[int] = 0
    escalate_after_ns: int = 0

    def apply(self, ctx: Ctx) -> bool | None:
        """Plan this step's writes for the current pressure."""
        raise NotImplementedError

    def undo(self, ctx: Ctx) -> bool:
        """Plan the writes that take this step back once the pressure is gone.
        False keeps the ladder where it is (tried again later)."""
        return True


class LastResort(LadderStep):
    """The top step (kill). It acts at most once per escalate_after_ns, and
    `guard` (the host at its budget) makes it act at any ladder level."""

    def guard(self, ctx: Ctx) -> bool:
        return False

    def apply(self, ctx: Ctx, guard: bool = False) -> bool:
        """True when it acted (planned a kill)."""
        raise NotImplementedError
