"""The memory ladder's steps: throttle (1) -> reclaim (2) -> freeze (3) ->
kill (4). Each runs only while there is pressure (a finding), once the step
below has been in force for its escalate_after_ns without relieving it, and
is undone from the top once the pressure is gone; see planner.py."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy.base import LadderStep, LastResort
from agentcg.core.policy.context import Ctx
from agentcg.core.policy.grants import asks_for_more, call_intent
from agentcg.core.policy.model import CallView, Reason, SessionView, fmt_ms
from agentcg.core.policy.registry import register
from agentcg.units import format_bytes as fb


def _victims(ctx: Ctx, prio: int) -> list[tuple[SessionView, CallView]]:
    """Calls of sessions with lower priority than `prio`, largest first."""
    out = [(s, c) for s, c in ctx.snap.calls() if s.priority < prio and not ctx.killed_planned(c.path)]
    out.sort(key=lambda sc: (sc[0].priority, -sc[1].cg.memory_current_bytes, sc[1].path))
    return out


def _top_reason(ctx: Ctx) -> Reason:
    f = max(ctx.findings, key=lambda f: f.priority)
    return f.reason()


@register("throttle")
@dataclass(frozen=True)
class Throttle(LadderStep):
    """Ladder step 1: hold every call at its memory.high (the kernel throttles
    it there) and take back borrowed headroom that calls of lower priorities
    than the pressured one are not using: their memory.high drops to the larger of
    their intent and their usage + keep_bytes.
    {name = "throttle", args = {keep_bytes = "8M"}}"""

    step = 1
    keep_bytes: int = 8 << 20
    default_call_bytes: int = 64 << 20

    def apply(self, ctx: Ctx) -> None:
        prio = ctx.pressured_priority()
        denied = {f.call for f in ctx.findings if f.call}
        reason = _top_reason(ctx)
        for sess, call in ctx.snap.calls():
            if sess.priority >= prio or call.path in denied or ctx.killed_planned(call.path):
                continue
            high = ctx.value(call.cg, "memory.high")
            if high is None:
                continue
            floor = max(call_intent(call, self.default_call_bytes), call.cg.memory_current_bytes + self.keep_bytes)
            if high > floor:
                ctx.set(call.cg, "memory.high", floor, Reason(reason.rule, reason.measured, reason.threshold,
                                                                detail="borrowed headroom returned"), sess.name)


@register("reclaim")
@dataclass(frozen=True)
class Reclaim(LadderStep):
    """Ladder step 2: lower-priority sessions give memory back: each of their
    calls gets memory.high = usage less reclaim_pct (not below floor_bytes),
    and the pressured sessions are protected with memory.low = their usage.
    Undone (memory.low back to what it was) once the pressure is gone.
    {name = "reclaim", args = {reclaim_pct = 10.0, floor_bytes = "16M", escalate_after_ns = "50ms"}}"""

    step = 2
    reclaim_pct: float = 10.0
    floor_bytes: int = 16 << 20
    escalate_after_ns: int = 50_000_000

    def apply(self, ctx: Ctx) -> None:
        prio = ctx.pressured_priority()
        reason = _top_reason(ctx)
        reclaimed = dict(ctx.st("reclaimed"))
        for sess, call in _victims(ctx, prio):
            cur = call.cg.memory_current_bytes
            target = max(self.floor_bytes, int(cur * (100 - self.reclaim_pct) / 100))
            high = ctx.value(call.cg, "memory.high")
            if high is None or high > target:
                reclaimed.setdefault(call.path, call.cg.memory_high_bytes)
                ctx.set(call.cg, "memory.high", target, Reason(
                    reason.rule, reason.measured, reason.threshold,
                    detail=f"reclaim {self.reclaim_pct:g}% from priority {sess.priority} < {prio}"), sess.name)
        protected = dict(ctx.st("protected"))
        for sess in ctx.snap.sessions:
            if sess.priority != prio or not any(s.priority < prio for s in ctx.snap.sessions):
                continue
            low = sess.cg.memory_current_bytes
            protected.setdefault(sess.path, sess.cg.memory_low_bytes)
            if abs(ctx.value(sess.cg, "memory.low") - low) > (4 << 20):
                ctx.set(sess.cg, "memory.low", low, Reason(
                    reason.rule, reason.measured, reason.threshold,
                    detail=f"protect priority {prio}"), sess.name)
        ctx.update(reclaimed=tuple(sorted(reclaimed.items(), key=lambda kv: kv[0])),
                   protected=tuple(sorted(protected.items())))

    def undo(self, ctx: Ctx) -> bool:
        reason = Reason(self.rule_name, "pressure gone", detail="memory.low restored", op="", threshold="")
        for path, old in ctx.st("protected"):
            sess = next((s for s in ctx.snap.sessions if s.path == path), None)
            if sess is not None:
                ctx.set(sess.cg, "memory.low", old, reason, sess.name)
        back = Reason(self.rule_name, "pressure gone", detail="memory.high given back", op="", threshold="")
        calls = ctx.snap.calls_by_path()
        for path, old in ctx.st("reclaimed"):
            if path in calls:
                s, c = calls[path]
                cur = ctx.value(c.cg, "memory.high")
                if cur is not None and (old is None or old > cur):
                    ctx.set(c.cg, "memory.high", old, back, s.name)
        ctx.update(protected=(), reclaimed=())
        return True


@register("freeze")
@dataclass(frozen=True)
class Freeze(LadderStep):
    """Ladder step 3: freeze (cgroup.freeze) the tool calls of lower-priority
    sessions while the pressure lasts. They keep their memory and state and
    resume where they stopped. Thawed once the pressure has been gone for the
    ladder's calm_hold_ns and host usage is below thaw_below_pct of the budget
    (or below hold_above_pct while no higher-priority call asks for memory).
    {name = "freeze", args = {escalate_after_ns = "200ms", thaw_below_pct = 90.0, hold_above_pct = 97.0}}"""

    step = 3
    escalate_after_ns: int = 200_000_000
    thaw_below_pct: float = 90.0
    hold_above_pct: float = 97.0
    near_pct: float = 90.0

    def _higher_asking(self, ctx: Ctx) -> bool:
        """A call of a priority above the lowest frozen one is at (near_pct of)
        its memory.high or breached it."""
        frozen = set(ctx.st("frozen"))
        prios = [s.priority for s, c in ctx.snap.calls() if c.path in frozen]
        if not prios:
            return False
        low = min(prios)
        for s, c in ctx.snap.calls():
            if s.priority > low and not c.cg.frozen and asks_for_more(c, ctx.value(c.cg, "memory.high"),
                                                                      self.near_pct):
                return True
        return False

    def apply(self, ctx: Ctx) -> None:
        prio = ctx.pressured_priority()
        reason = _top_reason(ctx)
        frozen = dict(ctx.st("frozen_since_ns"))
        for sess, call in _victims(ctx, prio):
            ctx.freeze(call.cg, Reason(reason.rule, reason.measured, reason.threshold,
                                       detail=f"priority {sess.priority} < {prio}"), sess.name,
                       feedback=(f"Tool call {call.call} was paused (frozen) while a higher-priority session "
                                 f"needed memory; it resumes where it stopped."))
            frozen.setdefault(call.path, ctx.now_ns)
        ctx.update(frozen_since_ns=tuple(sorted(frozen.items())), frozen=tuple(sorted(frozen)))

    def undo(self, ctx: Ctx) -> bool:
        """Thaw; False while the host is still too full (the ladder stays).
        Above thaw_below_pct of the budget the calls are still thawed when a
        higher priority no longer asks for memory and usage is below
        hold_above_pct: memory that agents hold at rest can keep a host above
        any fixed mark, and a frozen call must not wait for it forever."""
        host = ctx.snap.host
        budget = host.budget_bytes
        if budget is not None and host.usage_bytes > budget * self.thaw_below_pct / 100:
            if host.usage_bytes >= budget * self.hold_above_pct / 100 or self._higher_asking(ctx):
                return False
        by_path = ctx.snap.calls_by_path()
        reason = Reason(self.rule_name, "pressure gone", op="", threshold="",
                        detail="" if host.budget_bytes is None else
                        f"host {fb(host.usage_bytes)} <= {self.thaw_below_pct:g}% of {fb(host.budget_bytes)}")
        for path in ctx.st("frozen"):
            if path in by_path:
                s, c = by_path[path]
                ctx.thaw(c.cg, reason, s.name)
        ctx.update(frozen=(), frozen_since_ns=())
        return True


@register("kill")
@dataclass(frozen=True)
class Kill(LastResort):
    """Ladder step 4, the last resort: kill one tool call (cgroup.kill), never
    a session or the agent's own processes. Taken when the pressure outlived
    the freeze step by escalate_after_ns and there are lower-priority calls
    (and a higher priority is actually short: denied, stalled, or the host at
    its reserve mark; not while it was granted what it asked),
    when calls have waited for memory with no grant anywhere for deadlock_ns,
    or at once when host usage, less the idle page cache the kernel drops
    first (inactive_file), reaches oom_guard_pct of the budget (the kernel's
    OOM killer would otherwise pick a process itself; usage that is idle
    cache is reclaimed, not killed for). The victim is
    the lowest-priority call, frozen ones first, then the largest. One kill per
    escalate_after_ns; the agent gets feedback.
    {name = "kill", args = {escalate_after_ns = "2s", deadlock_ns = "5s", oom_guard_pct = 99.0}}"""

    step = 4
    escalate_after_ns: int = 2_000_000_000
    deadlock_ns: int = 5_000_000_000
    oom_guard_pct: float = 99.0

    def guard(self, ctx: Ctx) -> bool:
        """Host usage, less idle page cache and less what the calls killed
        earlier still hold (their memory is on its way back: a kill takes a
        few milliseconds to free it, and a tick in between must not count it
        again and kill one more), at oom_guard_pct of the budget."""
        host = ctx.snap.host
        if host.budget_bytes is None:
            return False
        dying = set(ctx.st("killed"))
        freeing = sum(c.cg.memory_current_bytes for _s, c in ctx.snap.calls() if c.path in dying)
        return host.pinned_bytes - freeing >= host.budget_bytes * self.oom_guard_pct / 100

    def apply(self, ctx: Ctx, guard: bool = False) -> bool:
        if not guard and ctx.findings and all(f.kind == "borrow" for f in ctx.findings):
            # a higher priority was granted what it asked (from lower priorities'
            # memory) and the host is below its reserve mark: nobody is short yet
            return False
        prio = ctx.pressured_priority()
        host = ctx.snap.host
        frozen = set(ctx.st("frozen"))
        if prio is not None:
            cands = _victims(ctx, prio)
        else:
            cands = []
        why = ""
        if guard:
            why = "host at its budget" + (f" ({fb(host.usage_bytes)} used, {fb(host.inactive_file_bytes)} "
                                          f"of it idle page cache)" if host.inactive_file_bytes else "")
            if not cands:
                cands = sorted(ctx.snap.calls(), key=lambda sc: (sc[0].priority, -sc[1].cg.memory_current_bytes))
        elif not cands:
            last = ctx.st("last_grant_ns")
            waiting = [f for f in ctx.findings if f.kind == "denied"]
            if waiting and last is not None and ctx.now_ns - last >= self.deadlock_ns:
                why = f"no memory granted for {fmt_ms(ctx.now_ns - last)}"
                names = {f.call for f in waiting}
                cands = [(s, c) for s, c in ctx.snap.calls() if c.path in names]
                cands.sort(key=lambda sc: (sc[0].priority, -sc[1].started_ns, -sc[1].cg.memory_current_bytes))
        gone = set(ctx.st("killed"))
        cands = [sc for sc in cands if not ctx.killed_planned(sc[1].path) and sc[1].path not in gone]
        if not cands:
            return False
        if not why or guard:
            cands.sort(key=lambda sc: (sc[0].priority, sc[1].path not in frozen, -sc[1].cg.memory_current_bytes))
        sess, call = cands[0]
        if guard:
            reason = Reason(self.rule_name, fb(host.pinned_bytes),
                            f"{fb(int(host.budget_bytes * self.oom_guard_pct / 100))} ({self.oom_guard_pct:g}% "
                            f"of budget {fb(host.budget_bytes)})", op=">=", detail=why)
        else:
            top = _top_reason(ctx)
            reason = Reason(self.rule_name, top.measured, top.threshold,
                            detail=why or f"pressure outlived freezing; priority {sess.priority}")
        ctx.kill(call, reason, feedback=(
            f"Tool call {call.call} was stopped to keep the host within its memory budget "
            f"({fb(call.cg.memory_current_bytes)} in use; {why or 'other sessions stayed short of memory'}). "
            f"The agent keeps running; retry later or with less memory."))
        ctx.update(killed=tuple(ctx.st("killed")) + (call.path,))
        return True
