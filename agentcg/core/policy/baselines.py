"""Baselines the replay benchmark compares agentcg against (the "static" and
"hint" presets): fixed per-session caps and per-command hints."""
from __future__ import annotations

import re
from dataclasses import dataclass

from agentcg.core.policy.base import Action
from agentcg.core.policy.context import Ctx
from agentcg.core.policy.model import Reason
from agentcg.core.policy.registry import register
from agentcg.units import format_bytes as fb


@register("static_session_max")
@dataclass(frozen=True)
class StaticSessionMax(Action):
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
class CommandHintHigh(Action):
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
