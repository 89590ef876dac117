"""ctypes mirror of bpf/agentcg.h, and decoding of ring-buffer records.

tests/unit/test_bpf_layout.py checks every size and offset here against
bpf/.output/layout.json, which the build generates from the header itself.
"""
from __future__ import annotations

import ctypes

from agentcg.core.attribution import ProcEvent

AGENTCG_COMM_LEN = 16
AGENTCG_FILENAME_LEN = 128
AGENTCG_ARGS_LEN = 256
AGENTCG_RUNQ_SLOTS = 32
AGENTCG_RINGBUF_BYTES = 1 << 20
AGENTCG_MAX_CGROUPS = 8192
AGENTCG_MAX_TASKS = 65536
AGENTCG_MAX_AGENTS = 1024
AGENTCG_MAX_STOPPED = 4096

AGENTCG_EV_FORK = 1
AGENTCG_EV_EXEC = 2
AGENTCG_EV_EXIT = 3
AGENTCG_EV_OOM = 4
NR_AGENTCG_EV = 5
AGENTCG_EVF_ARGS_TRUNCATED = 1
AGENTCG_EVF_STOPPED = 2

AGENTCG_NET_FULL = 0
AGENTCG_NET_LOCAL = 1
AGENTCG_NET_NONE = 2
NR_AGENTCG_NET = 3
NET_MODES = {"full": AGENTCG_NET_FULL, "local": AGENTCG_NET_LOCAL, "none": AGENTCG_NET_NONE}

AGENTCG_CTR_RINGBUF_DROPS = 0
AGENTCG_CTR_EVENTS = 1
AGENTCG_CTR_RUNQ_MISSES = 2
AGENTCG_CTR_NET_DENIED = 3
AGENTCG_CTR_EXEC_STOPS = 4
AGENTCG_CTR_STOP_FAILS = 5
NR_AGENTCG_CTR = 6

AGENTCG_SCHED_WEIGHT_MIN = 1
AGENTCG_SCHED_WEIGHT_DFL = 100
AGENTCG_SCHED_WEIGHT_MAX = 10000

EVENT_KINDS = {AGENTCG_EV_FORK: "fork", AGENTCG_EV_EXEC: "exec", AGENTCG_EV_EXIT: "exit", AGENTCG_EV_OOM: "oom"}


class AgentcgEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("exit_code", ctypes.c_int32),
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("comm", ctypes.c_char * AGENTCG_COMM_LEN),
        ("filename", ctypes.c_char * AGENTCG_FILENAME_LEN),
        ("args_len", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("args", ctypes.c_char * AGENTCG_ARGS_LEN),
    ]


class AgentcgCgStats(ctypes.Structure):
    _fields_ = [
        ("forks", ctypes.c_uint64),
        ("execs", ctypes.c_uint64),
        ("exits", ctypes.c_uint64),
        ("oom_kills", ctypes.c_uint64),
    ]


class AgentcgNetStats(ctypes.Structure):
    _fields_ = [
        ("tx_bytes", ctypes.c_uint64),
        ("rx_bytes", ctypes.c_uint64),
        ("tx_packets", ctypes.c_uint64),
        ("rx_packets", ctypes.c_uint64),
        ("denied", ctypes.c_uint64),
    ]


class AgentcgRunqHist(ctypes.Structure):
    _fields_ = [
        ("slots", ctypes.c_uint64 * AGENTCG_RUNQ_SLOTS),
        ("count", ctypes.c_uint64),
        ("sum_ns", ctypes.c_uint64),
    ]


class AgentcgSchedCg(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_uint32),
        ("boost", ctypes.c_uint32),
    ]


class AgentcgAgent(ctypes.Structure):
    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class AgentcgStopped(ctypes.Structure):
    _fields_ = [
        ("stop_ns", ctypes.c_uint64),
        ("start_boottime_ns", ctypes.c_uint64),
    ]


MIRRORS = {
    "agentcg_agent": AgentcgAgent,
    "agentcg_stopped": AgentcgStopped,
    "agentcg_event": AgentcgEvent,
    "agentcg_cg_stats": AgentcgCgStats,
    "agentcg_net_stats": AgentcgNetStats,
    "agentcg_runq_hist": AgentcgRunqHist,
    "agentcg_sched_cg": AgentcgSchedCg,
}


class EventDecodeError(ValueError):
    pass


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode_event(data: bytes) -> ProcEvent:
    """One ring-buffer record -> ProcEvent. Raises EventDecodeError on a bad record."""
    if len(data) < ctypes.sizeof(AgentcgEvent):
        raise EventDecodeError(f"event record of {len(data)} bytes, expected {ctypes.sizeof(AgentcgEvent)}")
    ev = AgentcgEvent.from_buffer_copy(data)
    kind = EVENT_KINDS.get(ev.type)
    if kind is None:
        raise EventDecodeError(f"unknown event type {ev.type}")
    argv: tuple[str, ...] = ()
    if kind == "exec":
        n = min(ev.args_len, AGENTCG_ARGS_LEN)
        off = AgentcgEvent.args.offset  # c_char arrays read as NUL-terminated: slice the record
        raw = bytes(data[off:off + n])
        parts = raw.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        argv = tuple(p.decode(errors="replace") for p in parts)
    return ProcEvent(
        kind=kind,
        pid=ev.pid,
        tgid=ev.tgid,
        ppid=ev.ppid,
        cgroup_id=ev.cgroup_id,
        ts_ns=ev.ts_ns,
        start_ns=ev.start_ns,
        comm=_cstr(ev.comm),
        filename=_cstr(ev.filename) if kind == "exec" else "",
        argv=argv,
        exit_code=ev.exit_code,
        args_truncated=bool(ev.flags & AGENTCG_EVF_ARGS_TRUNCATED),
        stopped=bool(ev.flags & AGENTCG_EVF_STOPPED),
    )


def hist_percentile_ns(slots: list[int] | tuple[int, ...], pct: float) -> int | None:
    """Upper bound (ns) of the log2 slot holding the pct-th percentile; None if empty."""
    total = sum(slots)
    if total == 0:
        return None
    if not 0 < pct <= 100:
        raise ValueError(f"pct={pct}: must be in (0, 100]")
    rank = pct / 100.0 * total
    acc = 0
    for i, c in enumerate(slots):
        acc += c
        if acc >= rank:
            return 1 << (i + 1)
    return 1 << len(slots)
