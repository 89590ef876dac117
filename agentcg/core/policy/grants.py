"""Memory grants: the budget arithmetic (what is promised, what a priority may
still be given) and the rules that plan every call's memory.high and
memory.max from it on every tick (burst_borrow, call_cap)."""
from __future__ import annotations

from dataclasses import dataclass

from agentcg.core.policy.base import Action
from agentcg.core.policy.context import Ctx, Finding
from agentcg.core.policy.model import CallView, Reason, SessionView
from agentcg.core.policy.registry import register
from agentcg.units import format_bytes as fb

# --------------------------------------------------------------------------- budget arithmetic


def call_intent(call: CallView, default_bytes: int) -> int:
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


def asks_for_more(call: CallView, high: int | None, near_pct: float) -> bool:
    """The call is at near_pct of its memory.high (as planned: `high`), or the
    kernel reported a breach of it since the last tick."""
    return high is not None and (call.cg.events_delta.high > 0
                                 or call.cg.memory_current_bytes >= high * near_pct / 100)


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
class BurstBorrow(Action):
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
            intent = call_intent(call, self.default_call_bytes)
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
            if not asks_for_more(call, high, self.near_pct):
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
class CallCap(Action):
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
