"""GPU memory budget: which tool calls may start now, and what the KV pool gives up.

Pure. In: a `GpuSnapshot` (devices and per-process GPU memory, read by
agentcg.adapters.nvml), the inference worker's KV pool (`WorkerPool`: its
size and how much of it can be given back without touching a running
request), the tool calls waiting to start with a declared `gpu_memory`
intent, and the running calls with their declared and observed use. Out: a
list of decisions, each with a plain-words reason:

- `Admit`       the call fits in what is free now;
- `Shrink`      the worker gives N bytes of its KV pool back first; the call
                stays pending and a later plan admits it once the memory
                shows as free (never more than the pool can give back);
- `Queue` / `Refuse`  it does not fit even then (`[gpu] on_no_room`);
- `Grow`        a call that made the pool shrink ended: take the bytes back;
- `OverUse`     a call uses more than it declared (numbers and a suggestion);
- `Kill`        ... and `[gpu] enforce = "kill"` says to stop it;
- `Undeclared`  a call without a `gpu_memory` intent uses the GPU (accounted).

The planner keeps no state: what the pool gave up for each call (`loans`) is
an input, kept by the caller from the `Shrink` decisions it carried out
(`loans_after`). See docs/gpu.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from agentcg.core.config import ConfigError
from agentcg.units import UnitError, format_bytes, parse_bytes

ENFORCE_MODES = ("report", "kill")
NO_ROOM_MODES = ("queue", "refuse")


# ---------------------------------------------------------------------------
# the snapshot (filled by agentcg.adapters.nvml)

@dataclass(frozen=True)
class GpuDevice:
    index: int
    total_bytes: int
    used_bytes: int
    free_bytes: int
    name: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """One process with a context on one device. used_bytes None: the driver
    does not report it (NVML_VALUE_NOT_AVAILABLE, e.g. under some vGPU/MIG
    setups); such a process is listed but not counted."""
    pid: int
    device_index: int
    used_bytes: int | None
    kind: str = "compute"          # "compute" | "graphics" | "compute+graphics"
    cgroup: str | None = None      # cgroup v2 path ("/agentcg/s1/c-3"), None if unknown


@dataclass(frozen=True)
class GpuSnapshot:
    devices: tuple[GpuDevice, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    absent_reason: str | None = None   # no GPU / no NVML / init failed: why
    errors: tuple[str, ...] = ()       # partial failures (one device's process list, ...)

    @property
    def present(self) -> bool:
        return self.absent_reason is None and bool(self.devices)

    def device(self, index: int) -> GpuDevice | None:
        return next((d for d in self.devices if d.index == index), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# attribution: which process's GPU memory belongs to which call or session

@dataclass(frozen=True)
class GpuUsage:
    by_call_bytes: Mapping[str, int] = field(default_factory=dict)
    by_session_bytes: Mapping[str, int] = field(default_factory=dict)  # agent processes, outside any call
    worker_bytes: int = 0
    other_bytes: int = 0               # processes that are none of ours
    unreported_pids: tuple[int, ...] = ()


def _owner_of(cgroup: str | None, owners: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """Longest owner path that is the cgroup or one of its ancestors."""
    if not cgroup:
        return None
    path = cgroup.rstrip("/") or "/"
    while True:
        if path in owners:
            return owners[path]
        if path in ("", "/"):
            return None
        path = path.rsplit("/", 1)[0] or "/"


def attribute(processes: Iterable[GpuProcess], owners: Mapping[str, tuple[str, str]],
              worker_pids: Iterable[int] = ()) -> GpuUsage:
    """Sum GPU memory per owner. owners: cgroup path -> ("call", call_id) or
    ("session", session_id); a process counts for the deepest owner above it
    (a call's cgroup lies inside its session's)."""
    wp = set(worker_pids)
    calls: dict[str, int] = {}
    sessions: dict[str, int] = {}
    worker = other = 0
    unreported: list[int] = []
    for p in processes:
        if p.used_bytes is None:
            unreported.append(p.pid)
            continue
        if p.pid in wp:
            worker += p.used_bytes
            continue
        owner = _owner_of(p.cgroup, owners)
        if owner is None:
            other += p.used_bytes
        elif owner[0] == "call":
            calls[owner[1]] = calls.get(owner[1], 0) + p.used_bytes
        else:
            sessions[owner[1]] = sessions.get(owner[1], 0) + p.used_bytes
    return GpuUsage(calls, sessions, worker, other, tuple(sorted(set(unreported))))


# ---------------------------------------------------------------------------
# planner inputs

@dataclass(frozen=True)
class GpuConfig:
    """The [gpu] table.

        [gpu]
        enforce = "report"        # "kill": stop a call that uses more than it declared
        on_no_room = "queue"      # "refuse": a call that cannot fit even after a shrink fails at once
        headroom = "256M"         # left free on each device (driver, fragmentation)
        overuse_tolerance_pct = 10
    """
    enforce: str = "report"
    on_no_room: str = "queue"
    headroom_bytes: int = 256 << 20
    overuse_tolerance_pct: int = 10

    @classmethod
    def from_mapping(cls, tbl: Mapping[str, Any]) -> "GpuConfig":
        known = ("enforce", "on_no_room", "headroom", "overuse_tolerance_pct")
        for k in tbl:
            if k not in known:
                raise ConfigError(f"gpu.{k}", tbl[k], f"is not a key of [gpu] (known: {', '.join(known)})")
        cfg = cls()
        enforce = tbl.get("enforce", cfg.enforce)
        if enforce not in ENFORCE_MODES:
            raise ConfigError("gpu.enforce", enforce, f"is not one of {'|'.join(ENFORCE_MODES)}")
        no_room = tbl.get("on_no_room", cfg.on_no_room)
        if no_room not in NO_ROOM_MODES:
            raise ConfigError("gpu.on_no_room", no_room, f"is not one of {'|'.join(NO_ROOM_MODES)}")
        try:
            headroom = parse_bytes(tbl.get("headroom", cfg.headroom_bytes))
        except UnitError as e:
            raise ConfigError("gpu.headroom", tbl.get("headroom"), f"is not a size ({e})") from None
        tol = tbl.get("overuse_tolerance_pct", cfg.overuse_tolerance_pct)
        if isinstance(tol, bool) or not isinstance(tol, int) or not 0 <= tol <= 1000:
            raise ConfigError("gpu.overuse_tolerance_pct", tol, "is not an integer in 0..1000")
        return cls(enforce=enforce, on_no_room=no_room, headroom_bytes=headroom, overuse_tolerance_pct=tol)


@dataclass(frozen=True)
class WorkerPool:
    """The worker's device KV pool. reclaimable_bytes: what `shrink` can give
    back without preempting a running request (free blocks and idle sessions'
    blocks), in whole chunks; shrink and grow move whole chunks."""
    device_index: int
    pool_bytes: int
    reclaimable_bytes: int
    chunk_bytes: int = 1


@dataclass(frozen=True)
class PendingCall:
    call_id: str
    session_id: str
    gpu_memory_bytes: int
    device_index: int | None = None    # None: any device


@dataclass(frozen=True)
class RunningCall:
    call_id: str
    session_id: str
    declared_bytes: int | None         # the gpu_memory intent; None: none declared
    observed_bytes: int = 0            # from attribute()
    device_index: int = 0              # where it was admitted (its reservation)


@dataclass(frozen=True)
class BudgetInput:
    gpus: GpuSnapshot
    pool: WorkerPool | None = None
    pending: tuple[PendingCall, ...] = ()
    running: tuple[RunningCall, ...] = ()
    ended: tuple[str, ...] = ()                       # call ids that ended (or were cancelled)
    loans: Mapping[str, int] = field(default_factory=dict)  # call id -> bytes the pool gave up for it


# ---------------------------------------------------------------------------
# decisions

@dataclass(frozen=True)
class Decision:
    call_id: str
    reason: str

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Admit(Decision):
    device_index: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Shrink(Decision):
    device_index: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Grow(Decision):
    nbytes: int = 0


@dataclass(frozen=True)
class Queue(Decision):
    pass


@dataclass(frozen=True)
class Refuse(Decision):
    pass


@dataclass(frozen=True)
class OverUse(Decision):
    declared_bytes: int = 0
    observed_bytes: int = 0
    suggestion: str = ""


@dataclass(frozen=True)
class Kill(Decision):
    pass


@dataclass(frozen=True)
class Undeclared(Decision):
    observed_bytes: int = 0


def loans_after(loans: Mapping[str, int], done: Iterable[Decision]) -> dict[str, int]:
    """The loans once `done` (the decisions carried out) took effect."""
    out = dict(loans)
    for d in done:
        if isinstance(d, Shrink):
            out[d.call_id] = out.get(d.call_id, 0) + d.nbytes
        elif isinstance(d, Grow):
            out.pop(d.call_id, None)
    return out


# ---------------------------------------------------------------------------
# the planner

def _round_up(n: int, step: int) -> int:
    step = max(1, step)
    return -(-n // step) * step


def _fmt(n: int) -> str:
    return format_bytes(max(0, n))


def suggest_bytes(observed_bytes: int) -> int:
    """A gpu_memory to declare: observed plus a quarter, rounded up to 256M."""
    return _round_up(observed_bytes + observed_bytes // 4, 256 << 20)


class _Room:
    """Free memory per device as this plan hands it out."""

    def __init__(self, inp: BudgetInput, cfg: GpuConfig, grows_bytes: int):
        self.free: dict[int, int] = {}
        self.note: dict[int, str] = {}
        reserved: dict[int, int] = {}
        for rc in inp.running:
            if rc.declared_bytes is not None:
                reserved[rc.device_index] = reserved.get(rc.device_index, 0) + \
                    max(0, rc.declared_bytes - rc.observed_bytes)
        for d in inp.gpus.devices:
            taken = {"reserved for running calls": reserved.get(d.index, 0),
                     "headroom": cfg.headroom_bytes}
            if inp.pool is not None and inp.pool.device_index == d.index and grows_bytes:
                taken["taken back by the KV pool"] = grows_bytes
            self.free[d.index] = d.free_bytes - sum(taken.values())
            less = ", ".join(f"{_fmt(v)} {k}" for k, v in taken.items() if v)
            self.note[d.index] = f"device {d.index} free {_fmt(d.free_bytes)}" + (f" less {less}" if less else "")
        self.reclaimable = self.pool_bytes = 0
        if inp.pool is not None:
            self.reclaimable = inp.pool.reclaimable_bytes + grows_bytes
            self.pool_bytes = inp.pool.pool_bytes + grows_bytes

    def best_device(self, pool: WorkerPool | None) -> int:
        def room(i: int) -> int:
            return self.free[i] + (self.reclaimable if pool is not None and pool.device_index == i else 0)
        return max(sorted(self.free), key=room)


def plan(inp: BudgetInput, cfg: GpuConfig = GpuConfig()) -> list[Decision]:
    """The decisions for one tick: grows for ended calls, then reports on
    running calls, then one decision per pending call (in the given order;
    a call that does not fit does not hold back smaller ones behind it)."""
    out: list[Decision] = list(_grows(inp, ended=set(inp.ended)))
    if not inp.gpus.present:
        why = inp.gpus.absent_reason or "no GPU devices"
        out += [Admit(p.call_id, f"no GPU budget: {why}; admitted with gpu_memory={_fmt(p.gpu_memory_bytes)} "
                                 "unchecked", p.device_index or 0, p.gpu_memory_bytes) for p in inp.pending]
        return out
    for rc in inp.running:
        out += _check_running(rc, cfg)
    room = _Room(inp, cfg, sum(d.nbytes for d in out if isinstance(d, Grow)))
    for pc in inp.pending:
        d = _admit(pc, inp, cfg, room)
        out.append(d)
        if isinstance(d, Refuse) and inp.loans.get(pc.call_id):
            out += _grows(inp, ended={pc.call_id}, why="its call was refused")
    return out


def _grows(inp: BudgetInput, ended: set[str], why: str = "its call ended") -> list[Grow]:
    out = []
    pool_bytes = inp.pool.pool_bytes if inp.pool else None
    for cid in sorted(ended):
        n = inp.loans.get(cid, 0)
        if n <= 0:
            continue
        change = "KV pool"
        if pool_bytes is not None:
            change = f"KV pool {_fmt(pool_bytes)} -> {_fmt(pool_bytes + n)}"
            pool_bytes += n
        out.append(Grow(cid, f"{change}: the {_fmt(n)} it gave up for call {cid} comes back, {why}", n))
    return out


def _check_running(rc: RunningCall, cfg: GpuConfig) -> list[Decision]:
    if rc.declared_bytes is None:
        if rc.observed_bytes <= 0:
            return []
        return [Undeclared(rc.call_id, f"call {rc.call_id} uses {_fmt(rc.observed_bytes)} of GPU memory without "
                                       f"a gpu_memory intent; accounted, not reserved (declare "
                                       f"gpu_memory={_fmt(suggest_bytes(rc.observed_bytes))} to have it reserved)",
                           rc.observed_bytes)]
    limit = rc.declared_bytes + rc.declared_bytes * cfg.overuse_tolerance_pct // 100
    if rc.observed_bytes <= limit:
        return []
    over = rc.observed_bytes - rc.declared_bytes
    suggestion = f"declare gpu_memory={_fmt(suggest_bytes(rc.observed_bytes))}"
    out: list[Decision] = [OverUse(
        rc.call_id, f"call {rc.call_id} uses {_fmt(rc.observed_bytes)} of GPU memory, {_fmt(over)} more than its "
                    f"gpu_memory={_fmt(rc.declared_bytes)} (tolerance {cfg.overuse_tolerance_pct}%)",
        rc.declared_bytes, rc.observed_bytes, suggestion)]
    if cfg.enforce == "kill":
        out.append(Kill(rc.call_id, f"[gpu] enforce = \"kill\": call {rc.call_id} uses "
                                    f"{_fmt(rc.observed_bytes)} > declared {_fmt(rc.declared_bytes)}; {suggestion}"))
    return out


def _no_room(pc: PendingCall, cfg: GpuConfig, why: str) -> Decision:
    if cfg.on_no_room == "refuse":
        return Refuse(pc.call_id, f"{why}; refused ([gpu] on_no_room = \"refuse\")")
    return Queue(pc.call_id, f"{why}; queued until memory is freed")


def _admit(pc: PendingCall, inp: BudgetInput, cfg: GpuConfig, room: _Room) -> Decision:
    need = pc.gpu_memory_bytes
    dev_i = room.best_device(inp.pool) if pc.device_index is None else pc.device_index
    dev = inp.gpus.device(dev_i)
    if dev is None:
        have = ", ".join(str(d.index) for d in inp.gpus.devices)
        return Refuse(pc.call_id, f"gpu device {dev_i} does not exist (devices: {have})")
    if need > dev.total_bytes - cfg.headroom_bytes:
        return Refuse(pc.call_id, f"gpu_memory={_fmt(need)} can never fit: device {dev_i} has "
                                  f"{_fmt(dev.total_bytes)} in all, {_fmt(cfg.headroom_bytes)} of it kept as headroom")
    free = room.free[dev_i]
    if need <= free:
        room.free[dev_i] = free - need
        return Admit(pc.call_id, f"gpu_memory={_fmt(need)} fits: {room.note[dev_i]} = {_fmt(free)} -> "
                                 f"{_fmt(free - need)}", dev_i, need)
    lent = inp.loans.get(pc.call_id, 0)
    if lent:
        room.free[dev_i] = min(0, free)   # what is free now waits for this call
        return Queue(pc.call_id, f"waiting for the {_fmt(lent)} the KV pool gave back to show as free: "
                                 f"needs {_fmt(need)}, {room.note[dev_i]} = {_fmt(free)}")
    pool = inp.pool
    short = need - free            # room below zero (reservations, headroom) is made up too
    if pool is None or pool.device_index != dev_i:
        return _no_room(pc, cfg, f"gpu_memory={_fmt(need)} does not fit: {room.note[dev_i]} = {_fmt(free)}, "
                                 f"no KV pool on device {dev_i} to shrink")
    ask = _round_up(short, pool.chunk_bytes)
    if ask > room.reclaimable:
        return _no_room(pc, cfg, f"gpu_memory={_fmt(need)} does not fit: {room.note[dev_i]} = {_fmt(free)}, and "
                                 f"the KV pool can give back only {_fmt(room.reclaimable)} of the {_fmt(short)} "
                                 "missing without touching a running request")
    room.reclaimable -= ask
    room.free[dev_i] = free + ask - need   # the rounding's remainder stays free
    room.pool_bytes -= ask
    return Shrink(pc.call_id, f"KV pool {_fmt(room.pool_bytes + ask)} -> {_fmt(room.pool_bytes)} for call "
                              f"{pc.call_id}: gpu_memory={_fmt(need)}, {room.note[dev_i]} = {_fmt(free)}; admitted "
                              "once the memory shows as free", dev_i, ask)
