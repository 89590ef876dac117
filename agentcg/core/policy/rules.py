"""The policy's rules. Each is a frozen dataclass registered by name; its
docstring is its user documentation, with a config example.

Detectors (`psi_pressure`) report findings. Independent rules (`burst_borrow`,
`call_cap`, `cpu_classes`, `boost_blocking`, the baselines) plan writes every
tick. Ladder steps (`throttle`, `reclaim`, `freeze`, `kill`, step 1..4) run
only while there is pressure, each one only once the previous one has been in
force for its `escalate_after_ns` without relieving it; see planner.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from agentcg.core.policy.context import Ctx, Finding
from agentcg.core.policy.model import (
    NS_PER_US, CallView, CgroupView, Reason, SessionView, fmt_ms,
)
from agentcg.core.policy.registry import RuleBase, register
from agentcg.units import format_bytes as fb

# --------------------------------------------------------------------------- detectors


@register("psi_pressure")
@dataclass(frozen=True)
class PsiPressure(RuleBase):
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
        total = cg.psi.some_total_us if self.kind == "some" else cg.psi.full_total_us
        measured = 0
        for prev in ctx.state.psi_prev:
            if prev[0] == cg.path:
                dt_ns = ctx.now_ns - prev[1]
                delta = max(0, total - (prev[2] if self.kind == "some" else prev[3]))
                window_ns = self.window_us * NS_PER_US
                measured = delta if dt_ns <= window_ns else int(delta * window_ns / dt_ns)
                break
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


# --------------------------------------------------------------------------- grants


def _call_intent(call: CallView, default_bytes: int) -> int:
    return call.intent_memory_bytes if call.intent_memory_bytes else default_bytes


def _headroom(ctx: Ctx, call: CallView) -> int:
    """The part of a call's memory.high (as planned so far) it has not used yet."""
    high = ctx.value(call.cg, "memory.high")
    return 0 if high is None else max(0, high - call.cg.memory_current_bytes)


def _committed(ctx: Ctx, min_priority: int | None = None) -> int:
    """Host usage plus the headroom already promised to calls of priority
    >= min_priority (all calls when None): the part of their memory.high they
    have not used yet. Lower priorities' unused headroom is not a promise to a
    higher priority: the ladder's throttle step takes it back."""
    used = ctx.snap.host.usage_bytes
    for s, c in ctx.snap.calls():
        if min_priority is None or s.priority >= min_priority:
            used += _headroom(ctx, c)
    return used


def _reclaimable(ctx: Ctx, sess: SessionView) -> int:
    """What the ladder can take back from a session's tool calls: what they
    hold above their declared intents, and never below the session's protected
    floor (its memory.low, its memory intent, its agent's own memory: the
    ladder never touches the agent)."""
    calls = sum(max(0, c.cg.memory_current_bytes - (c.intent_memory_bytes or 0))
                for c in sess.calls if not ctx.killed_planned(c.path))
    agent = sess.agent.memory_current_bytes if sess.agent else 0
    floor = max(sess.cg.memory_low_bytes, sess.intent_memory_bytes or 0, agent)
    return max(0, min(calls, sess.cg.memory_current_bytes - floor))


def _freed_by_kills(ctx: Ctx) -> int:
    """What the kills planned so far this tick give back."""
    return sum(c.cg.memory_current_bytes for _s, c in ctx.snap.calls() if ctx.killed_planned(c.path))


def available_to(ctx: Ctx, priority: int, limit: int) -> int:
    """Memory a call of `priority` may be promised now: the free budget (less
    what is already promised to its own and higher priorities) and what the
    kills planned this tick give back. Only where the tree has swap, also what
    lower priorities hold above their protected floors (up to the free swap):
    the ladder's reclaim pushes it out. Without swap, memory that is frozen or
    throttled stays resident, so it backs no promise: a grant counted on it
    would let the budget's memory.max be reached and the kernel's OOM killer
    choose."""
    avail = limit - _committed(ctx, priority) + _freed_by_kills(ctx)
    swap = ctx.snap.host.swap_bytes or 0
    if swap > 0:
        below = sum(_reclaimable(ctx, s) for s in ctx.snap.sessions if s.priority < priority)
        avail += min(below, swap)
    return avail


@register("burst_borrow")
@dataclass(frozen=True)
class BurstBorrow(RuleBase):
    """Every tool call runs under a memory.high: its intent (or
    default_call_bytes). When it reaches near_pct of that mark (or the kernel
    reports a memory.high breach) it borrows more, step by step (the larger of
    step_min_bytes, step_pct of its usage and share_pct of what is available
    split over the calls), while the host keeps reserve_pct of its budget free;
    higher priorities are served first.

    What a call of priority p may borrow is the free budget, less what is
    already promised to calls of priority >= p (see available_to: lower
    priorities' memory counts only where there is swap to push it to).
    Calls of a session that has a higher priority above it leave yield_pct
    of the budget free: they are held at their mark (the kernel throttles
    them) while they still hold little, so that the higher priorities'
    bursts are served from free memory and nothing has to be killed for
    them. Such a wait is a "yield" finding, which drives no ladder step and
    no kill. A new call still starts with min_call_bytes where the free
    budget has it, so small calls (a read, an edit) are not throttled. A call that has lower priorities below it
    borrows in larger steps (priority_step_pct of what is available to it, up
    to priority_step_max_bytes), because bursts of 1-2 GB within a second
    happen. The calls of the highest priority present, when lower priorities
    exist, never start below their intent (or default_call_bytes) while the
    budget has that much left, however full the host is otherwise. Lower
    priorities cannot borrow what is promised to higher ones, so they wait at
    their mark (a "denied" finding).

    When such a call asks for more than the free budget can back (so the grant
    draws on lower priorities' memory), or uses what it borrowed (the free
    budget falls below half a step while it still holds unused headroom), that
    is reported as pressure at its priority and the ladder takes the memory
    from the lower priorities: kind "borrow" while the host is below its
    reserve mark (throttle, reclaim, freeze), "pressure" once host usage
    reaches it (the kill step may act).
    Without a host budget (the root's memory.max is "max") there is nothing to
    ration and calls run unmarked.
    {name = "burst_borrow", args = {default_call_bytes = "64M", step_min_bytes = "64M", step_pct = 50.0, reserve_pct = 3.0, yield_pct = 20.0, min_call_bytes = "16M"}}"""

    default_call_bytes: int = 64 << 20
    step_min_bytes: int = 64 << 20
    step_pct: float = 50.0
    near_pct: float = 90.0
    reserve_pct: float = 3.0
    share_pct: float = 50.0
    priority_step_pct: float = 25.0
    priority_step_max_bytes: int = 1 << 30
    yield_pct: float = 20.0
    min_call_bytes: int = 16 << 20

    def _asking(self, call: CallView, high: int | None) -> bool:
        return high is not None and (call.cg.events_delta.high > 0
                                     or call.cg.memory_current_bytes >= high * self.near_pct / 100)

    def evaluate(self, ctx: Ctx) -> None:
        host = ctx.snap.host
        budget = host.budget_bytes
        if budget is None:  # nothing to ration: calls run unmarked
            return
        limit = int(budget * (100 - self.reserve_pct) / 100)
        order = sorted(ctx.snap.calls(), key=lambda sc: (-sc[0].priority, sc[1].started_ns, sc[1].path))
        prios = [s.priority for s in ctx.snap.sessions]
        lowest = min(prios, default=0)
        highest = max(prios, default=0)
        for sess, call in order:
            if ctx.killed_planned(call.path) or call.cg.frozen:
                continue
            cur = call.cg.memory_current_bytes
            high = ctx.value(call.cg, "memory.high")
            intent = _call_intent(call, self.default_call_bytes)
            has_below = sess.priority > lowest
            yields = sess.priority < highest
            own_limit = limit - int(budget * self.yield_pct / 100) if yields else limit
            avail = available_to(ctx, sess.priority, own_limit)
            share = max(0, avail) * self.share_pct / 100 / max(1, len(order))
            big = 0
            if has_below:
                big = min(self.priority_step_max_bytes, int(max(0, avail) * self.priority_step_pct / 100))
            if high is None:
                want = max(intent, cur + self.step_min_bytes, int(cur + share), cur + big)
                new = max(cur, min(want, cur + max(0, avail)))
                floor = ""
                if has_below and sess.priority == highest:
                    # its intent, within what the budget physically has left
                    start = min(intent, cur + max(0, budget - host.usage_bytes))
                    if new < start:
                        new, floor = start, "; the highest priority present starts at its intent"
                elif yields and new < cur + self.min_call_bytes:
                    # the room kept for higher priorities does not throttle a small call
                    # (a read, an edit) from its first page: min_call_bytes, where free
                    start = cur + min(self.min_call_bytes, max(0, available_to(ctx, sess.priority, limit)))
                    if new < start:
                        new, floor = start, f"; a call starts with up to {fb(self.min_call_bytes)}"
                ctx.set(call.cg, "memory.high", new, Reason(
                    self.rule_name, f"new call, intent {fb(intent)}", op="", threshold="",
                    detail=f"host free {fb(max(0, limit - host.usage_bytes))}, available to priority "
                           f"{sess.priority}: {fb(max(0, avail))}{floor}"), sess.name)
                ctx.granted = True
                continue
            if not self._asking(call, high):
                continue
            near = high * self.near_pct / 100
            step = max(self.step_min_bytes, int(cur * self.step_pct / 100), int(share), big)
            grant = min(step, max(0, avail))
            real_free = limit - host.usage_bytes
            if has_below and real_free < step:
                # the free budget cannot back this step: the rest comes from lower
                # priorities, and the ladder has to take it from them
                short = real_free <= 0
                ctx.findings.append(Finding(
                    self.rule_name, f"{call.path} at {fb(cur)} of {fb(high)} asks {fb(step)}",
                    f"host free {fb(max(0, real_free))} (" + (f"usage at the reserve mark {fb(limit)})" if short
                                                               else "lower priorities hold the rest)"),
                    session=sess.name, call=call.path, priority=sess.priority,
                    kind="pressure" if short else "borrow"))
            if grant * 4 < min(step, self.step_min_bytes):  # less than a quarter step left: denied
                # held back only by the room kept for higher priorities: it waits for them
                waits = yields and available_to(ctx, sess.priority, limit) * 4 >= min(step, self.step_min_bytes)
                ctx.findings.append(Finding(
                    self.rule_name, f"{call.path} at {fb(cur)} of {fb(high)}, available {fb(max(0, avail))}",
                    f"{fb(step)} needed" + (f"; {self.yield_pct:g}% of the budget is kept for higher "
                                            f"priorities" if waits else ""),
                    session=sess.name, call=call.path, priority=sess.priority,
                    kind="yield" if waits else "denied"))
                continue
            new = max(high, cur) + grant
            ctx.set(call.cg, "memory.high", new, Reason(
                self.rule_name, f"{fb(cur)}", f"{fb(int(near))} ({self.near_pct:g}% of {fb(high)})",
                op=">=", detail=f"host free {fb(max(0, limit - host.usage_bytes))}, available to priority "
                                f"{sess.priority}: {fb(avail)}"), sess.name)
            ctx.granted = True
        self._using_borrowed(ctx, limit, lowest)
        if ctx.granted:
            ctx.update(last_grant_ns=ctx.now_ns)

    def _using_borrowed(self, ctx: Ctx, limit: int, lowest: int) -> None:
        """A higher priority is using what it borrowed: the free budget has
        fallen below half a step while calls of that priority (or above)
        still hold unused headroom, which only lower priorities can back now.
        Reported at the highest such priority, unless a call of it already
        reported this tick."""
        host = ctx.snap.host
        real_free = limit - host.usage_bytes
        for prio in sorted({s.priority for s in ctx.snap.sessions if s.priority > lowest}, reverse=True):
            promised = sum(_headroom(ctx, c) for s, c in ctx.snap.calls()
                           if s.priority >= prio and not c.cg.frozen and not ctx.killed_planned(c.path))
            if promised <= 0 or real_free >= min(promised, self.step_min_bytes // 2):
                continue
            if any(f.priority >= prio and f.kind in ("borrow", "pressure") for f in ctx.findings):
                return
            short = real_free <= 0
            ctx.findings.append(Finding(
                self.rule_name, f"priority {prio} promised {fb(promised)}",
                f"host free {fb(max(0, real_free))} (" + (f"usage at the reserve mark {fb(limit)})" if short
                                                           else "lower priorities hold the rest)"),
                priority=prio, kind="pressure" if short else "borrow"))
            return


@register("call_cap")
@dataclass(frozen=True)
class CallCap(RuleBase):
    """A session's hard cap (its memory.max, or its intent memory_max) holds
    the agent and all its calls. So that a call which alone outgrows the cap
    can never take the agent with it, each call gets memory.max = cap - the
    agent's usage - margin_bytes (the kernel stops the call first); a call
    that reaches kill_pct of that mark is killed with feedback.
    {name = "call_cap", args = {margin_bytes = "16M", kill_pct = 98.0}}"""

    margin_bytes: int = 16 << 20
    kill_pct: float = 98.0

    def evaluate(self, ctx: Ctx) -> None:
        for sess in ctx.snap.sessions:
            cap = sess.cg.memory_max_bytes or sess.intent_memory_max_bytes
            if cap is None:
                continue
            agent_bytes = sess.agent.memory_current_bytes if sess.agent else 0
            call_max = max(self.margin_bytes, cap - agent_bytes - self.margin_bytes)
            for call in sess.calls:
                own = call.intent_memory_max_bytes
                if own is not None and own < call_max:
                    # The call declared a tighter hard cap of its own: the
                    # kernel enforces it (and the daemon reports an OOM kill);
                    # this rule only keeps it from being loosened.
                    cur_max = ctx.value(call.cg, "memory.max")
                    if cur_max is not None and cur_max > own:
                        ctx.set(call.cg, "memory.max", own, Reason(
                            self.rule_name, fb(cur_max), f"declared memory_max {fb(own)}"), sess.name)
                    continue
                cur = call.cg.memory_current_bytes
                mark = int(call_max * self.kill_pct / 100)
                if cur >= mark and (call.cg.events_delta.high or call.cg.events_delta.max
                                    or call.cg.events_delta.oom or cur >= call_max):
                    ctx.kill(call, Reason(self.rule_name, fb(cur), f"{fb(mark)} ({self.kill_pct:g}% of call cap "
                                          f"{fb(call_max)})", op=">="),
                             feedback=(f"Tool call {call.call} was stopped: it used {fb(cur)}, which alone "
                                       f"exceeds the {fb(cap)} memory cap of session {sess.name} "
                                       f"(the agent itself uses {fb(agent_bytes)}). The agent keeps running. "
                                       f"Run it with less memory (fewer parallel workers, a smaller test "
                                       f"subset) or ask for a larger memory_max."))
                    continue
                cur_max = ctx.value(call.cg, "memory.max")
                if cur_max is None or abs(cur_max - call_max) > self.margin_bytes:
                    ctx.set(call.cg, "memory.max", call_max, Reason(
                        self.rule_name, f"session cap {fb(cap)} - agent {fb(agent_bytes)}", op="",
                        threshold=""), sess.name)
                high = ctx.value(call.cg, "memory.high")
                if high is not None and high > call_max:
                    ctx.set(call.cg, "memory.high", call_max, Reason(
                        self.rule_name, f"{fb(high)}", f"call cap {fb(call_max)}"), sess.name)


# --------------------------------------------------------------------------- ladder


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
class Throttle(RuleBase):
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
            floor = max(_call_intent(call, self.default_call_bytes), call.cg.memory_current_bytes + self.keep_bytes)
            if high > floor:
                ctx.set(call.cg, "memory.high", floor, Reason(reason.rule, reason.measured, reason.threshold,
                                                                detail="borrowed headroom returned"), sess.name)

    def undo(self, ctx: Ctx) -> None:
        return None


@register("reclaim")
@dataclass(frozen=True)
class Reclaim(RuleBase):
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

    def undo(self, ctx: Ctx) -> None:
        reason = Reason(self.rule_name, "pressure gone", detail="memory.low restored", op="", threshold="")
        for path, old in ctx.st("protected"):
            sess = next((s for s in ctx.snap.sessions if s.path == path), None)
            if sess is not None:
                ctx.set(sess.cg, "memory.low", old, reason, sess.name)
        back = Reason(self.rule_name, "pressure gone", detail="memory.high given back", op="", threshold="")
        calls = {c.path: (s, c) for s, c in ctx.snap.calls()}
        for path, old in ctx.st("reclaimed"):
            if path in calls:
                s, c = calls[path]
                cur = ctx.value(c.cg, "memory.high")
                if cur is not None and (old is None or old > cur):
                    ctx.set(c.cg, "memory.high", old, back, s.name)
        ctx.update(protected=(), reclaimed=())


@register("freeze")
@dataclass(frozen=True)
class Freeze(RuleBase):
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
            high = ctx.value(c.cg, "memory.high")
            if s.priority > low and not c.cg.frozen and high is not None and (
                    c.cg.events_delta.high > 0 or c.cg.memory_current_bytes >= high * self.near_pct / 100):
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
        by_path = {c.path: (s, c) for s, c in ctx.snap.calls()}
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
class Kill(RuleBase):
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

    def undo(self, ctx: Ctx) -> None:
        return None


# --------------------------------------------------------------------------- cpu


@register("cpu_classes")
@dataclass(frozen=True)
class CpuClasses(RuleBase):
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
class BoostBlocking(RuleBase):
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


# --------------------------------------------------------------------------- baselines


@register("static_session_max")
@dataclass(frozen=True)
class StaticSessionMax(RuleBase):
    """Baseline, container style: every session gets memory.max = the host
    budget / sessions (sessions = 0: the number of sessions present).
    {name = "static_session_max", args = {sessions = 16}}"""

    sessions: int = 0

    def evaluate(self, ctx: Ctx) -> None:
        budget = ctx.snap.host.budget_bytes
        n = self.sessions or len(ctx.snap.sessions)
        if budget is None or n == 0:
            return
        share = budget // n
        for sess in ctx.snap.sessions:
            ctx.set(sess.cg, "memory.max", share, Reason(self.rule_name, f"budget {fb(budget)} / {n}", op="",
                                                         threshold=""), sess.name)


DEFAULT_BIG_PATTERNS = (r"\bpytest\b", r"\bpip3?\b", r"\bnpm\b", r"\bcargo\b", r"\bmake\b", r"\btox\b",
                        r"\bunittest\b", r"\bmvn\b", r"\bgradle\b", r"\buv\b", r"\bconda\b", r"\bpoetry\b",
                        r"\bsetup\.py\b", r"\bgo (test|build)\b", r"\bjest\b")


@register("command_hint_high")
@dataclass(frozen=True)
class CommandHintHigh(RuleBase):
    """Baseline, the per-tool-call hint approach: a call whose command matches
    one of big_patterns (test runners, package installs, builds) gets
    memory.high = big_bytes, every other call small_bytes, once, at start.
    {name = "command_hint_high", args = {big_bytes = "1G", small_bytes = "128M"}}"""

    big_bytes: int = 1 << 30
    small_bytes: int = 128 << 20
    big_patterns: tuple[str, ...] = DEFAULT_BIG_PATTERNS

    def check(self) -> str | None:
        for p in self.big_patterns:
            try:
                re.compile(p)
            except re.error as exc:
                return f"big_patterns: bad regular expression {p!r}: {exc}"
        return None

    def evaluate(self, ctx: Ctx) -> None:
        for sess, call in ctx.snap.calls():
            if call.cg.memory_high_bytes is not None:
                continue
            big = any(re.search(p, call.cmd) for p in self.big_patterns)
            ctx.set(call.cg, "memory.high", self.big_bytes if big else self.small_bytes, Reason(
                self.rule_name, f"command {'matches' if big else 'does not match'} a big-job pattern",
                op="", threshold=""), sess.name)
