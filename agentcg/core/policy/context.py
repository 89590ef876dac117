"""The working area of one decision: the snapshot, the planned writes so far,
the pressure findings, and the state to hand back. Pure; no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentcg.core.policy.model import (
    Action, CallView, CgroupView, PolicyState, Reason, SessionView, Snapshot,
)


@dataclass(frozen=True)
class Finding:
    """Someone is short of memory. session None = the host as a whole."""

    rule: str
    measured: str
    threshold: str
    session: str | None = None
    call: str | None = None
    priority: int = 0
    kind: str = "pressure"  # "pressure" | "denied"

    def reason(self, detail: str = "") -> Reason:
        return Reason(self.rule, self.measured, self.threshold, detail=detail)


@dataclass
class Ctx:
    snap: Snapshot
    state: PolicyState
    actions: list[Action] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    planned: dict[tuple[str, str], Any] = field(default_factory=dict)
    updates: dict[str, Any] = field(default_factory=dict)
    granted: bool = False

    @property
    def now_ns(self) -> int:
        return self.snap.now_ns

    def st(self, name: str) -> Any:
        return self.updates.get(name, getattr(self.state, name))

    def update(self, **kw: Any) -> None:
        self.updates.update(kw)

    # -- values as they will be after the writes planned so far
    def value(self, cg: CgroupView, knob: str) -> Any:
        key = (cg.path, knob)
        if key in self.planned:
            return self.planned[key]
        return {
            "memory.high": cg.memory_high_bytes,
            "memory.max": cg.memory_max_bytes,
            "memory.low": cg.memory_low_bytes,
            "cpu.weight": cg.cpu_weight,
            "cpu.max": cg.cpu_max,
            "cgroup.freeze": 1 if cg.frozen else 0,
        }[knob]

    def _drop(self, target: str, knob: str) -> None:
        self.actions = [a for a in self.actions if not (a.target == target and a.knob == knob)]

    def set(self, cg: CgroupView, knob: str, new: Any, reason: Reason, session: str = "") -> bool:
        """Plan `knob := new` on cg; a later plan for the same file replaces an
        earlier one. No action when the file already holds `new`."""
        current = {
            "memory.high": cg.memory_high_bytes, "memory.max": cg.memory_max_bytes,
            "memory.low": cg.memory_low_bytes, "cpu.weight": cg.cpu_weight, "cpu.max": cg.cpu_max,
        }[knob]
        if knob.startswith("memory.") and isinstance(new, int):
            page = self.snap.host.page_bytes
            new -= new % page  # what the kernel would keep of it
        self._drop(cg.path, knob)
        self.planned[(cg.path, knob)] = new
        if current == new:
            return False
        self.actions.append(Action("set", cg.path, knob, current, new, reason, session=session))
        return True

    def freeze(self, cg: CgroupView, reason: Reason, session: str, feedback: str = "") -> bool:
        self._drop(cg.path, "cgroup.freeze")
        self.planned[(cg.path, "cgroup.freeze")] = 1
        if cg.frozen:
            return False
        self.actions.append(Action("freeze", cg.path, "cgroup.freeze", 0, 1, reason, feedback, session))
        return True

    def thaw(self, cg: CgroupView, reason: Reason, session: str) -> bool:
        self._drop(cg.path, "cgroup.freeze")
        self.planned[(cg.path, "cgroup.freeze")] = 0
        if not cg.frozen:
            return False
        self.actions.append(Action("thaw", cg.path, "cgroup.freeze", 1, 0, reason, session=session))
        return True

    def kill(self, call: CallView, reason: Reason, feedback: str) -> None:
        if not _is_call_path(call.path):
            raise ValueError(f"refusing to kill {call.path!r}: only tool-call cgroups are ever killed")
        if (call.path, "cgroup.kill") in self.planned:
            return
        self.planned[(call.path, "cgroup.kill")] = 1
        self.actions.append(Action("kill", call.path, "cgroup.kill", 0, 1, reason, feedback, call.session))

    def killed_planned(self, path: str) -> bool:
        return (path, "cgroup.kill") in self.planned

    # -- lookups
    def session(self, name: str) -> SessionView | None:
        return self.snap.find_session(name)

    def pressured_priority(self) -> int | None:
        if not self.findings:
            return None
        return max(f.priority for f in self.findings)


def _is_call_path(path: str) -> bool:
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    return leaf.startswith("c-") and "/" in path
