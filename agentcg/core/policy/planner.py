"""decide(snapshot, ruleset) -> actions: one pure step of the policy.

Order within a tick:
1. independent rules and detectors, in config order (grants, caps, CPU,
   PSI findings);
2. the memory ladder, if anything is short of memory (a finding):
   throttle (1) -> reclaim (2) -> freeze (3) -> kill (4). The ladder climbs one
   step at a time, and only once the current step has been in force for the
   next step's escalate_after_ns without relieving the pressure. Steps already
   reached stay in force while the pressure lasts.
3. once no finding has been seen for ladder.calm_hold_ns, the steps are
   undone from the top (thaw, memory.low restored) and the ladder is back at 0.

The kill step's oom guard (host at its budget) fires at any level.
State between ticks is a PolicyState, carried in the snapshot and returned.
"""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy.base import LadderStep, LastResort
from agentcg.core.policy.context import Ctx
from agentcg.core.policy.model import Action, PolicyState, PsiSample, Snapshot
from agentcg.core.policy.registry import Ruleset


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    state: PolicyState
    findings: tuple = ()
    wake_in_ns: int | None = None  # when the ladder wants another look without a new signal


def plan(snapshot: Snapshot, ruleset: Ruleset, state: PolicyState | None = None) -> Decision:
    state = snapshot.state if state is None else state
    ctx = Ctx(snapshot, state)
    now = snapshot.now_ns
    steps = ruleset.ladder_steps()
    for rule in ruleset.rules:
        if not isinstance(rule, LadderStep):
            rule.evaluate(ctx)

    level = state.level
    level_since = state.level_since_ns
    wake: int | None = None
    kill_rule = next((r for r in steps if isinstance(r, LastResort)), None)
    # Only pressure felt by a priority that has someone below it can be relieved
    # by the ladder; the lowest priority short of memory waits (or, deadlocked,
    # meets the kill step's deadlock check below).
    lowest = min((s.priority for s in snapshot.sessions), default=0)
    all_findings = list(ctx.findings)
    # A call that yields to higher priorities (burst_borrow's room kept for
    # them) waits; that is no pressure to act on.
    driving = [f for f in all_findings if f.priority > lowest and f.kind != "yield"]
    ctx.findings = driving
    if driving:
        ctx.update(calm_since_ns=None)
        if state.pressure_since_ns is None:
            ctx.update(pressure_since_ns=now)
        if steps:
            if level == 0:
                level, level_since = steps[0].step, now
            else:
                nxt = next((r for r in steps if r.step > level), None)
                if nxt is not None:
                    waited = now - level_since
                    after = nxt.escalate_after_ns
                    if waited >= after:
                        level, level_since = nxt.step, now
                    else:
                        wake = after - waited
            for rule in steps:
                if rule.step > level:
                    break
                if rule is kill_rule:
                    # one kill per escalate_after_ns: at the step's entry, then after each cool-down
                    cooldown = rule.escalate_after_ns
                    if level_since == now or now - level_since >= cooldown:
                        if rule.apply(ctx):
                            level_since = now
                    wake = cooldown - (now - level_since) or cooldown
                else:
                    rule.apply(ctx)
    elif level > 0:
        calm_since = state.calm_since_ns if state.calm_since_ns is not None else now
        ctx.update(calm_since_ns=calm_since)
        if now - calm_since >= ruleset.ladder.calm_hold_ns:
            done = True
            for rule in reversed(steps):
                if rule.step <= level and not rule.undo(ctx):
                    done = False
            if done:
                level, level_since = 0, now
                ctx.update(pressure_since_ns=None, calm_since_ns=None)
            else:
                wake = ruleset.ladder.calm_hold_ns
        else:
            wake = ruleset.ladder.calm_hold_ns - (now - calm_since)
    ctx.findings = all_findings
    if kill_rule is not None:
        if kill_rule.guard(ctx):
            kill_rule.apply(ctx, guard=True)
        elif not driving and any(f.kind == "denied" for f in all_findings):
            kill_rule.apply(ctx)  # only its deadlock check can fire here

    # remember PSI totals for the next tick's stall measurement
    prev = [PsiSample.of(snapshot.host.cg, now)] + [PsiSample.of(s.cg, now) for s in snapshot.sessions]
    live = {c.path for _s, c in snapshot.calls()}
    frozen = tuple(p for p in ctx.st("frozen") if p in live)
    frozen_since = tuple(kv for kv in ctx.st("frozen_since_ns") if kv[0] in live)
    new_state = state.with_(**ctx.updates).with_(level=level, level_since_ns=level_since, psi_prev=tuple(prev),
                                                  frozen=frozen, frozen_since_ns=frozen_since,
                                                  killed=tuple(p for p in ctx.st("killed") if p in live))
    return Decision(tuple(ctx.actions), new_state, tuple(all_findings), wake)


def decide(snapshot: Snapshot, ruleset: Ruleset) -> list[Action]:
    """The actions for this snapshot (its `state` field carries the ladder)."""
    return list(plan(snapshot, ruleset).actions)
