"""Resource intents: what an agent declares for a session or a tool call.

Parsing (from a dict or from the command-line form ``memory=2G,cpu=latency``),
validation (errors name the field and the value), and the pure mapping from an
intent to cgroup v2 interface-file values under a budget:

- a tool call is clamped to its session's limits (never rejected for asking
  too much: the agent gets its work done and is told what was lowered);
- a session is checked against the grant of its owner uid and rejected with
  `BudgetError` when it asks for more (the operator's configuration decides).

The mapping table lives in docs/intents.md; keep the two in step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from agentcg.core.errors import FieldError
from agentcg.core.model import Adjustment, Grant, Limits
from agentcg.units import UnitError, format_bytes, parse_bytes, parse_duration_ns

MEMORY_CLASSES: dict[str, int] = {
    "low": 256 << 20,
    "normal": 1 << 30,
    "high": 4 << 30,
}
"""memory=<class> -> bytes."""

CPU_CLASSES: dict[str, int] = {
    "batch": 25,
    "normal": 100,
    "latency": 400,
}
"""cpu=<class> -> cpu.weight (kernel default is 100)."""

NETWORK_MODES = ("none", "local", "full")
PRIORITY_MIN, PRIORITY_DEFAULT, PRIORITY_MAX = 1, 5, 10
WEIGHT_MIN, WEIGHT_MAX = 1, 10000

# accepted spellings -> canonical field name
_ALIASES = {
    "memory": "memory", "mem": "memory",
    "memory_max": "memory_max", "mem_max": "memory_max",
    "cpu": "cpu", "cpu_weight": "cpu",
    "cpu_max": "cpu_max",
    "pids_max": "pids_max", "pids": "pids_max",
    "io_weight": "io_weight", "io": "io_weight",
    "duration": "duration",
    "gpu_memory": "gpu_memory", "gpu_mem": "gpu_memory",
    "priority": "priority",
    "network": "network", "net": "network",
}
FIELD_NAMES = ("memory", "memory_max", "cpu", "cpu_max", "pids_max", "io_weight",
               "duration", "gpu_memory", "priority", "network")


class IntentError(FieldError):
    """A bad intent. `field` and `value` name what was wrong."""


class BudgetError(ValueError):
    """A session intent above what the configuration grants its owner."""

    def __init__(self, field: str, requested: Any, granted: Any, uid: int):
        self.field = field
        self.requested = requested
        self.granted = granted
        self.uid = uid
        super().__init__(f"{field}: {requested} is more than uid {uid} is granted ({granted})")


@dataclass(frozen=True)
class Intent:
    """A validated intent. None = not declared (a default or the budget decides)."""

    memory_bytes: int | None = None
    memory_class: str | None = None
    memory_max_bytes: int | None = None
    cpu_weight: int | None = None
    cpu_class: str | None = None
    cpu_max_pct: int | None = None
    pids_max: int | None = None
    io_weight: int | None = None
    duration_ns: int | None = None
    gpu_memory_bytes: int | None = None
    priority: int | None = None
    network: str | None = None

    # -- construction ---------------------------------------------------
    @classmethod
    def parse(cls, source: "Intent | Mapping[str, Any] | str | None") -> "Intent":
        """From an Intent, a dict (`{"memory": "2G"}`), a CLI string or None."""
        if source is None:
            return cls()
        if isinstance(source, Intent):
            return source
        if isinstance(source, str):
            return cls.from_string(source)
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        raise IntentError("intent", source, "is not a mapping or a 'key=value,...' string")

    @classmethod
    def from_string(cls, text: str) -> "Intent":
        """'memory=2G,cpu=latency,pids=256' (commas or spaces between pairs)."""
        pairs: dict[str, str] = {}
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise IntentError("intent", part, "is not key=value (e.g. memory=2G,cpu=latency)")
            name = _canonical(key.strip())
            if name in pairs:
                raise IntentError(name, value, "is given twice")
            pairs[name] = value.strip()
        return cls.from_dict(pairs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Intent":
        kw: dict[str, Any] = {}
        seen: set[str] = set()
        for key, value in data.items():
            name = _canonical(str(key))
            if name in seen:
                raise IntentError(name, value, "is given twice")
            seen.add(name)
            if value is None:
                continue
            kw.update(_PARSERS[name](name, value))
        return cls(**kw)

    # -- views ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical form that `from_dict` reads back; only declared fields."""
        out: dict[str, Any] = {}
        if self.memory_class is not None:
            out["memory"] = self.memory_class
        elif self.memory_bytes is not None:
            out["memory"] = self.memory_bytes
        if self.memory_max_bytes is not None:
            out["memory_max"] = self.memory_max_bytes
        if self.cpu_class is not None:
            out["cpu"] = self.cpu_class
        elif self.cpu_weight is not None:
            out["cpu"] = self.cpu_weight
        if self.cpu_max_pct is not None:
            out["cpu_max"] = f"{self.cpu_max_pct}%"
        for name in ("pids_max", "io_weight", "priority", "network"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.duration_ns is not None:
            out["duration"] = f"{self.duration_ns}ns"
        if self.gpu_memory_bytes is not None:
            out["gpu_memory"] = self.gpu_memory_bytes
        return out

    def describe(self) -> str:
        """Short human form: 'memory=64M,cpu=latency,pids=256'."""
        parts = []
        for key, value in self.to_dict().items():
            if key in ("memory", "memory_max", "gpu_memory") and isinstance(value, int):
                value = format_bytes(value)
            parts.append(f"{key}={value}")
        return ",".join(parts)

    def over(self, base: "Intent") -> "Intent":
        """This intent's declared fields on top of `base` (e.g. config defaults)."""
        kw = {f.name: getattr(base, f.name) for f in fields(self)}
        if self.memory_bytes is not None:
            kw["memory_bytes"], kw["memory_class"] = self.memory_bytes, self.memory_class
        if self.cpu_weight is not None:
            kw["cpu_weight"], kw["cpu_class"] = self.cpu_weight, self.cpu_class
        for f in fields(self):
            if f.name in ("memory_bytes", "memory_class", "cpu_weight", "cpu_class"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                kw[f.name] = value
        return Intent(**kw)


def _canonical(key: str) -> str:
    name = _ALIASES.get(key.strip().lower().replace("-", "_"))
    if name is None:
        raise IntentError(key, key, f"is not an intent field (known: {', '.join(FIELD_NAMES)})")
    return name


def _size(field: str, value: Any) -> int:
    try:
        n = parse_bytes(value)
    except (UnitError, TypeError):
        raise IntentError(field, value, "is not a size (e.g. 512M, 2G)") from None
    if n <= 0:
        raise IntentError(field, value, "must be more than 0")
    return n


def _int_in(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise IntentError(field, value, f"is not a whole number in {lo}..{hi}")
    try:
        n = int(value) if isinstance(value, int) else int(str(value).strip(), 10)
    except ValueError:
        raise IntentError(field, value, f"is not a whole number in {lo}..{hi}") from None
    if not lo <= n <= hi:
        raise IntentError(field, value, f"is out of range {lo}..{hi}")
    return n


def _p_memory(field: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value.strip().lower() in MEMORY_CLASSES:
        cls = value.strip().lower()
        return {"memory_bytes": MEMORY_CLASSES[cls], "memory_class": cls}
    if isinstance(value, str) and value.strip() and value.strip()[0].isalpha():
        raise IntentError(field, value, f"is not a size or a class ({'|'.join(MEMORY_CLASSES)})")
    return {"memory_bytes": _size(field, value)}


def _p_memory_max(field: str, value: Any) -> dict[str, Any]:
    return {"memory_max_bytes": _size(field, value)}


def _p_cpu(field: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value.strip().lower() in CPU_CLASSES:
        cls = value.strip().lower()
        return {"cpu_weight": CPU_CLASSES[cls], "cpu_class": cls}
    if isinstance(value, str) and value.strip() and not value.strip().isdigit():
        raise IntentError(field, value,
                          f"is not a weight {WEIGHT_MIN}..{WEIGHT_MAX} or a class ({'|'.join(CPU_CLASSES)})")
    return {"cpu_weight": _int_in(field, value, WEIGHT_MIN, WEIGHT_MAX)}


def _p_cpu_max(field: str, value: Any) -> dict[str, Any]:
    """'150%' or '1.5' (CPUs) -> 150 (% of one CPU)."""
    if isinstance(value, bool):
        raise IntentError(field, value, "is not a CPU count (1.5) or a percentage (150%)")
    text = str(value).strip()
    try:
        pct = float(text[:-1]) if text.endswith("%") else float(text) * 100
    except ValueError:
        raise IntentError(field, value, "is not a CPU count (1.5) or a percentage (150%)") from None
    if not 1 <= pct <= 100 * 4096:
        raise IntentError(field, value, "is out of range 1%..409600%")
    return {"cpu_max_pct": int(round(pct))}


def _p_pids(field: str, value: Any) -> dict[str, Any]:
    return {"pids_max": _int_in(field, value, 1, 4_194_304)}


def _p_io(field: str, value: Any) -> dict[str, Any]:
    return {"io_weight": _int_in(field, value, WEIGHT_MIN, WEIGHT_MAX)}


def _p_duration(field: str, value: Any) -> dict[str, Any]:
    try:
        ns = parse_duration_ns(value)
    except (UnitError, TypeError):
        raise IntentError(field, value, "is not a duration (e.g. 30s, 5m)") from None
    return {"duration_ns": ns}


def _p_gpu(field: str, value: Any) -> dict[str, Any]:
    return {"gpu_memory_bytes": _size(field, value)}


def _p_priority(field: str, value: Any) -> dict[str, Any]:
    return {"priority": _int_in(field, value, PRIORITY_MIN, PRIORITY_MAX)}


def _p_network(field: str, value: Any) -> dict[str, Any]:
    text = str(value).strip().lower()
    if text not in NETWORK_MODES:
        raise IntentError(field, value, f"is not one of {'|'.join(NETWORK_MODES)}")
    return {"network": text}


_PARSERS = {
    "memory": _p_memory, "memory_max": _p_memory_max, "cpu": _p_cpu, "cpu_max": _p_cpu_max,
    "pids_max": _p_pids, "io_weight": _p_io, "duration": _p_duration, "gpu_memory": _p_gpu,
    "priority": _p_priority, "network": _p_network,
}


# -- mapping ---------------------------------------------------------------

def _scale_weight(weight: int | None, priority: int | None) -> int | None:
    """Session priority scales its weights: 5 -> x1, 10 -> x2, 1 -> x0.2."""
    if priority is None or priority == PRIORITY_DEFAULT:
        return weight
    base = 100 if weight is None else weight
    return max(WEIGHT_MIN, min(WEIGHT_MAX, base * priority // PRIORITY_DEFAULT))


def session_limits(intent: Intent, grant: Grant, uid: int) -> Limits:
    """Limits for a session cgroup. Raises BudgetError when the intent asks
    for more than `grant` (memory_max, cpu_max, pids_max, priority)."""
    def check(field: str, requested: int | None, granted: int | None, show=str) -> int | None:
        if requested is None:
            return granted
        if granted is not None and requested > granted:
            raise BudgetError(field, show(requested), show(granted), uid)
        return requested

    memory_max = check("memory_max", intent.memory_max_bytes, grant.memory_max_bytes, format_bytes)
    if intent.memory_bytes is not None and grant.memory_max_bytes is not None \
            and intent.memory_bytes > grant.memory_max_bytes:
        raise BudgetError("memory", format_bytes(intent.memory_bytes),
                          format_bytes(grant.memory_max_bytes), uid)
    cpu_max = check("cpu_max", intent.cpu_max_pct, grant.cpu_max_pct, lambda v: f"{v}%")
    pids_max = check("pids_max", intent.pids_max, grant.pids_max)
    priority = intent.priority
    if priority is not None and priority > grant.max_priority:
        raise BudgetError("priority", priority, grant.max_priority, uid)
    memory_low = intent.memory_bytes
    if memory_low is not None and memory_max is not None:
        memory_low = min(memory_low, memory_max)
    return Limits(
        memory_high_bytes=None,
        memory_max_bytes=memory_max,
        memory_low_bytes=memory_low,
        cpu_weight=_scale_weight(intent.cpu_weight, priority),
        cpu_max_pct=cpu_max,
        pids_max=pids_max,
        io_weight=_scale_weight(intent.io_weight, priority),
    )


def call_limits(intent: Intent, session: Limits) -> tuple[Limits, list[Adjustment]]:
    """Limits for a tool-call cgroup, clamped to its session's limits.
    Returns the limits and the list of values that the budget lowered."""
    adjustments: list[Adjustment] = []

    def clamp(field: str, requested: int | None, ceiling: int | None, why: str) -> int | None:
        if requested is None:
            return ceiling
        if ceiling is not None and requested > ceiling:
            adjustments.append(Adjustment(field, requested, ceiling, why))
            return ceiling
        return requested

    session_max = session.memory_max_bytes
    memory_max = clamp("memory_max", intent.memory_max_bytes, session_max,
                       "session memory_max budget")
    memory_high = intent.memory_bytes
    if memory_high is not None and memory_max is not None and memory_high >= memory_max:
        if memory_high > memory_max:
            adjustments.append(Adjustment("memory", memory_high, memory_max,
                                          "memory.high cannot exceed memory.max"))
        memory_high = None  # the hard cap is the only limit: no throttling below it
    cpu_max = clamp("cpu_max", intent.cpu_max_pct, session.cpu_max_pct, "session cpu_max budget")
    pids_max = clamp("pids_max", intent.pids_max, session.pids_max, "session pids_max budget")
    return Limits(
        memory_high_bytes=memory_high,
        memory_max_bytes=memory_max,
        memory_low_bytes=None,
        cpu_weight=intent.cpu_weight,
        cpu_max_pct=cpu_max,
        pids_max=pids_max,
        io_weight=intent.io_weight,
    ), adjustments


def with_grant_priority(intent: Intent, grant: Grant) -> Intent:
    """The intent with its priority defaulted (unset -> min(5, max_priority))."""
    if intent.priority is not None:
        return intent
    return replace(intent, priority=min(PRIORITY_DEFAULT, grant.max_priority))
