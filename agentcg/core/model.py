"""Frozen value types shared by core, adapters and the daemon.

Nothing here does I/O. Every quantity carries its unit in its name.

- `Limits`: the cgroup v2 interface-file values computed for one cgroup.
- `Grant`: what the configuration grants one owner uid (a session's ceiling).
- `CallStats`: what the kernel accounted for one tool call.
- `FeedbackItem`: one plain-words finding for the agent, with its numbers.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

# what a session or tool-call name may be (a cgroup and log-friendly word)
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CPU_MAX_PERIOD_US = 100_000
"""cpu.max period: 100 ms, the kernel's default. A quota of 100% is one CPU."""


@dataclass(frozen=True)
class Limits:
    """Values for one cgroup's interface files. None = leave the kernel default
    ("max" for the caps, 0 for memory.low, 100 for the weights)."""

    memory_high_bytes: int | None = None
    memory_max_bytes: int | None = None
    memory_low_bytes: int | None = None
    cpu_weight: int | None = None
    cpu_max_pct: int | None = None
    pids_max: int | None = None
    io_weight: int | None = None

    def files(self) -> dict[str, str]:
        """Interface file name -> the exact string to write into it."""
        out: dict[str, str] = {}
        if self.memory_low_bytes is not None:
            out["memory.low"] = str(self.memory_low_bytes)
        if self.memory_high_bytes is not None:
            out["memory.high"] = str(self.memory_high_bytes)
        if self.memory_max_bytes is not None:
            out["memory.max"] = str(self.memory_max_bytes)
        if self.cpu_weight is not None:
            out["cpu.weight"] = str(self.cpu_weight)
        if self.cpu_max_pct is not None:
            quota_us = max(1000, self.cpu_max_pct * CPU_MAX_PERIOD_US // 100)
            out["cpu.max"] = f"{quota_us} {CPU_MAX_PERIOD_US}"
        if self.pids_max is not None:
            out["pids.max"] = str(self.pids_max)
        if self.io_weight is not None:
            # "default N" sets the weight for all devices without a per-device entry.
            out["io.weight"] = f"default {self.io_weight}"
        return out

    def to_dict(self) -> dict[str, Any]:
        # flat scalar fields: a plain copy (asdict's deep copy costs ~20x more, and
        # the state file serialises every running call's limits at each change)
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Limits":
        known = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Grant:
    """The most a session of one owner uid may get. None = unlimited."""

    memory_max_bytes: int | None = None
    cpu_max_pct: int | None = None
    pids_max: int | None = None
    max_priority: int = 5
    max_sessions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Adjustment:
    """A requested value that a budget lowered; reported back to the caller."""

    field: str
    requested: int
    granted: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CallStats:
    """What the kernel accounted for one tool call's cgroup. None = not
    available on this kernel/controller set (e.g. no memory controller)."""

    wall_ns: int = 0
    cpu_usage_usec: int | None = None
    cpu_user_usec: int | None = None
    cpu_system_usec: int | None = None
    cpu_nr_throttled: int | None = None
    cpu_throttled_usec: int | None = None
    memory_peak_bytes: int | None = None
    memory_current_bytes: int | None = None
    memory_events: dict[str, int] = field(default_factory=dict)
    pids_peak: int | None = None
    pids_events_max: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    stragglers: int = 0
    stragglers_action: str | None = None  # "killed" | "kept" | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat copy (every call's end serialises one: asdict's deep copy
        cost ~0.1 ms); hooks' values in `extra` are plain data already, a
        dataclass among them is turned into a dict."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["memory_events"] = dict(self.memory_events)
        d["extra"] = {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v
                      for k, v in self.extra.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallStats":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class FeedbackItem:
    """One finding about a tool call, in plain words, with the numbers."""

    kind: str
    message: str
    suggestion: str
    numbers: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        return f"{self.message} {self.suggestion}".strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeedbackItem":
        return cls(kind=data["kind"], message=data["message"],
                   suggestion=data.get("suggestion", ""), numbers=dict(data.get("numbers", {})))
