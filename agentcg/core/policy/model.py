"""Frozen value types of the policy core: what it sees, and what it asks for.

The snapshot is one consistent reading of the managed tree at `now_ns`
(a field, never a clock read here). Actions say which interface file of which
cgroup to change, from what to what, and why. Nothing in this module does I/O.

Cgroups are named by their path relative to the daemon's root: a session is
"s-42", its tool calls "s-42/c-17", the agent's own leaf "s-42/agent".
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from agentcg.units import format_bytes

NS_PER_MS = 1_000_000
NS_PER_US = 1_000


@dataclass(frozen=True)
class Psi:
    """One cgroup's memory.pressure reading. avg10 in percent, totals in us."""

    some_avg10_pct: float = 0.0
    full_avg10_pct: float = 0.0
    some_total_us: int = 0
    full_total_us: int = 0


@dataclass(frozen=True)
class TriggerEvent:
    """A PSI trigger that fired since the previous snapshot: the kernel saw at
    least `stall_us` of `kind` stall within `window_us`."""

    kind: str  # "some" | "full"
    stall_us: int
    window_us: int


@dataclass(frozen=True)
class MemEvents:
    """memory.events counters (or their deltas since the previous snapshot)."""

    low: int = 0
    high: int = 0
    max: int = 0
    oom: int = 0
    oom_kill: int = 0

    def minus(self, other: "MemEvents") -> "MemEvents":
        """Delta self - other; a counter that went backwards (cgroup recreated)
        counts from zero."""
        def d(a: int, b: int) -> int:
            return a - b if a >= b else a
        return MemEvents(d(self.low, other.low), d(self.high, other.high), d(self.max, other.max),
                         d(self.oom, other.oom), d(self.oom_kill, other.oom_kill))

    def any(self) -> bool:
        return bool(self.high or self.max or self.oom or self.oom_kill)


@dataclass(frozen=True)
class CgroupView:
    """What the policy reads of one cgroup. `*_bytes = None` means "max"
    (unlimited); memory_low_bytes 0 means no protection."""

    path: str
    memory_current_bytes: int = 0
    memory_high_bytes: int | None = None
    memory_max_bytes: int | None = None
    memory_low_bytes: int = 0
    psi: Psi = field(default_factory=Psi)
    triggers: tuple[TriggerEvent, ...] = ()
    events_delta: MemEvents = field(default_factory=MemEvents)
    frozen: bool = False
    cpu_weight: int | None = None
    cpu_max: str | None = None  # the file's text, e.g. "max 100000"


@dataclass(frozen=True)
class CallView:
    """One running tool call."""

    session: str
    call: str  # "c-17"
    cg: CgroupView
    started_ns: int = 0
    intent_memory_bytes: int | None = None  # what the call (or its session) declared
    intent_memory_max_bytes: int | None = None
    cpu_class: str | None = None  # "latency" | "batch" | None
    blocking: bool = True  # the agent waits for this call's result
    cmd: str = ""

    @property
    def path(self) -> str:
        return self.cg.path

    def age_ns(self, now_ns: int) -> int:
        return max(0, now_ns - self.started_ns)


@dataclass(frozen=True)
class SessionView:
    """One session: its cgroup, its agent leaf and its running calls."""

    name: str
    cg: CgroupView
    priority: int = 0  # higher = more important
    agent: CgroupView | None = None
    calls: tuple[CallView, ...] = ()
    intent_memory_bytes: int | None = None
    intent_memory_max_bytes: int | None = None
    cpu_class: str | None = None

    @property
    def path(self) -> str:
        return self.cg.path


@dataclass(frozen=True)
class HostView:
    """The parent of all sessions. budget_bytes is its memory.max, or the
    configured budget where the parent has none (None = no budget known).
    swap_bytes: swap the tree can still use (the smaller of the host's free
    swap and the tree's memory.swap.max); 0 or None = none, and then memory
    that is frozen or throttled stays resident: only a call that ends or is
    killed gives memory back. inactive_file_bytes: page cache in the tree
    that the kernel reclaims first, without touching anyone's working set
    (memory.stat inactive_file): the part of usage that is such cache is no
    reason for anyone to die. page_bytes: the kernel's page size."""

    cg: CgroupView
    budget_bytes: int | None = None
    swap_bytes: int | None = None
    inactive_file_bytes: int = 0
    # the kernel keeps memory.{high,max,low} in whole pages (a write is
    # rounded down): plans are made in the same unit, or a value that is not
    # a page multiple would never read back as set and be written every tick
    page_bytes: int = 4096

    @property
    def usage_bytes(self) -> int:
        return self.cg.memory_current_bytes

    @property
    def pinned_bytes(self) -> int:
        """Usage the kernel cannot give back by dropping idle page cache."""
        return max(0, self.usage_bytes - self.inactive_file_bytes)

    @property
    def slack_bytes(self) -> int | None:
        if self.budget_bytes is None:
            return None
        return self.budget_bytes - self.usage_bytes


@dataclass(frozen=True)
class PsiSample:
    """A cgroup's memory.pressure stall totals at t_ns: what the next tick
    measures the growth of the stall against (PSI totals only grow)."""

    path: str
    t_ns: int
    some_total_us: int
    full_total_us: int

    @classmethod
    def of(cls, cg: CgroupView, t_ns: int) -> "PsiSample":
        return cls(cg.path, t_ns, cg.psi.some_total_us, cg.psi.full_total_us)

    def stall_us(self, psi: Psi, kind: str, now_ns: int, window_ns: int) -> int:
        """Stall of `kind` ("some" | "full") since this sample, as `psi` reads
        now: the whole growth when the interval fits in window_ns, else the
        growth scaled down to one window."""
        if kind == "some":
            delta = max(0, psi.some_total_us - self.some_total_us)
        else:
            delta = max(0, psi.full_total_us - self.full_total_us)
        dt_ns = now_ns - self.t_ns
        return delta if dt_ns <= window_ns else int(delta * window_ns / dt_ns)


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between ticks. Returned, never mutated.

    level: the memory ladder's current step (0 = calm, then 1 throttle,
    2 reclaim, 3 freeze, 4 kill). pressure_since_ns / calm_since_ns: when the
    current pressure episode (or calm spell) began. frozen: calls this policy
    froze. reclaimed: cgroup -> memory.high before the policy lowered it.
    protected: sessions given memory.low. killed: calls this policy killed.
    psi_prev: the PSI totals of the host and every session at the last tick.
    """

    level: int = 0
    level_since_ns: int = 0
    pressure_since_ns: int | None = None
    calm_since_ns: int | None = None
    frozen: tuple[str, ...] = ()
    frozen_since_ns: tuple[tuple[str, int], ...] = ()
    reclaimed: tuple[tuple[str, int | None], ...] = ()
    protected: tuple[tuple[str, int], ...] = ()
    killed: tuple[str, ...] = ()
    psi_prev: tuple[PsiSample, ...] = ()
    last_grant_ns: int | None = None

    def with_(self, **kw: Any) -> "PolicyState":
        return replace(self, **kw)

    def psi_sample(self, path: str) -> PsiSample | None:
        return next((p for p in self.psi_prev if p.path == path), None)


@dataclass(frozen=True)
class Snapshot:
    """One reading of the managed tree."""

    now_ns: int
    host: HostView
    sessions: tuple[SessionView, ...] = ()
    state: PolicyState = field(default_factory=PolicyState)

    def find_session(self, name: str) -> SessionView | None:
        for s in self.sessions:
            if s.name == name:
                return s
        return None

    def calls(self) -> list[tuple[SessionView, CallView]]:
        return [(s, c) for s in self.sessions for c in s.calls]

    def calls_by_path(self) -> dict[str, tuple[SessionView, CallView]]:
        return {c.path: (s, c) for s, c in self.calls()}


@dataclass(frozen=True)
class Reason:
    """Why an action is taken: the rule, what it measured, the threshold."""

    rule: str
    measured: str
    threshold: str = ""
    op: str = ">"
    detail: str = ""

    def render(self) -> str:
        body = f"{self.measured} {self.op} {self.threshold}" if self.threshold else self.measured
        if self.detail:
            body = f"{body}; {self.detail}"
        return f"{self.rule}: {body}"

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "measured": self.measured, "threshold": self.threshold,
                "op": self.op, "detail": self.detail}


KINDS = ("set", "freeze", "thaw", "kill")


@dataclass(frozen=True)
class Action:
    """Change one interface file of one cgroup.

    kind "set": write `new` into `knob` (memory.high/max/low, cpu.weight,
    cpu.max); None means "max". "freeze"/"thaw": cgroup.freeze 1/0.
    "kill": cgroup.kill of a tool call (never a session or agent leaf);
    `feedback` is the sentence the agent gets.
    """

    kind: str
    target: str
    knob: str
    old: int | str | None
    new: int | str | None
    reason: Reason
    feedback: str = ""
    session: str = ""

    def render(self) -> str:
        return f"{self.knob} {_fmt(self.knob, self.old)} -> {_fmt(self.knob, self.new)} on {self.target} ({self.reason.render()})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "knob": self.knob, "old": self.old,
                "new": self.new, "reason": self.reason.to_dict(), "feedback": self.feedback,
                "session": self.session, "text": self.render()}


def _fmt(knob: str, value: int | str | None) -> str:
    if value is None:
        return "max"
    if knob.startswith("memory.") and isinstance(value, int):
        return format_bytes(value)
    return str(value)


def fmt_ms(ns: int | float) -> str:
    ms = ns / NS_PER_MS
    return f"{ms:.0f}ms" if ms >= 10 or ms == int(ms) else f"{ms:.1f}ms"
