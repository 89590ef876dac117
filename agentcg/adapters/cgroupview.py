"""Interface-file text -> the policy core's CgroupView: the parsers of the
files the policy reads, and the reader that keeps what a view needs from the
previous reading (memory.events counters, for their delta).

The text comes from a `FileSource`: `CgroupFs` (by path) or `OpenFiles`
(descriptors kept open, what the policy loop uses); both are in cgroupfs.py,
the only code that touches the files. Nothing here opens a file itself.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from agentcg.adapters.psi import read_psi
from agentcg.core.policy.model import CgroupView, MemEvents, Psi, TriggerEvent

# what one full view reads of a cgroup (an agent leaf is read for memory.current only)
VIEW_FILES = ("memory.current", "memory.events", "memory.pressure", "cgroup.freeze", "memory.high",
              "memory.max", "memory.low", "cpu.weight", "cpu.max")


class FileSource(Protocol):
    def read(self, rel: str, name: str) -> str | None: ...


def parse_int(text: str | None, default: int | None = None) -> int | None:
    """A single-value file: an int, None for "max" or empty, `default` when
    absent (None text) or not a number."""
    if text is None:
        return default
    text = text.strip()
    if text == "max" or not text:
        return None
    try:
        return int(text)
    except ValueError:
        return default


def parse_flat_keyed(text: str | None) -> dict[str, int]:
    """A flat-keyed file ("key value" lines: memory.events, memory.stat,
    cpu.stat, cgroup.events); lines that are not two fields with an integer
    value are skipped."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def parse_mem_events(text: str | None) -> MemEvents:
    kv = parse_flat_keyed(text)
    return MemEvents(kv.get("low", 0), kv.get("high", 0), kv.get("max", 0), kv.get("oom", 0), kv.get("oom_kill", 0))


def parse_psi(text: str | None) -> Psi:
    psi = read_psi(text)
    some, full = psi.get("some", {}), psi.get("full", {})
    return Psi(some.get("avg10", 0.0), full.get("avg10", 0.0), int(some.get("total", 0)), int(full.get("total", 0)))


def view_from(rel: str, read: FileSource, events_delta: MemEvents = MemEvents(),
              triggers: Iterable[TriggerEvent] = ()) -> CgroupView:
    """One cgroup's view from its files; `events_delta` and `triggers` are
    what the caller knows since its previous reading."""
    r = read.read
    return CgroupView(
        rel, parse_int(r(rel, "memory.current"), 0) or 0, parse_int(r(rel, "memory.high")),
        parse_int(r(rel, "memory.max")), parse_int(r(rel, "memory.low"), 0) or 0,
        parse_psi(r(rel, "memory.pressure")), tuple(triggers), events_delta,
        (r(rel, "cgroup.freeze") or "0").strip() == "1",
        parse_int(r(rel, "cpu.weight")), (r(rel, "cpu.max") or "").strip() or None)


class ViewReader:
    """Views of the same cgroups, reading after reading. memory.events is a
    counter: a view carries its growth since this reader's previous view of
    the cgroup (nothing the first time). `files` is the FileSource."""

    def __init__(self, files: FileSource):
        self.files = files
        self.prev_events: dict[str, MemEvents] = {}

    def read_view(self, rel: str, triggers: Iterable[TriggerEvent] = ()) -> CgroupView:
        ev = parse_mem_events(self.files.read(rel, "memory.events"))
        prev = self.prev_events.get(rel)
        self.prev_events[rel] = ev
        return view_from(rel, self.files, MemEvents() if prev is None else ev.minus(prev), triggers)

    def read_usage(self, rel: str) -> CgroupView:
        """Only memory.current (an agent leaf: the ladder never acts on it)."""
        return CgroupView(rel, parse_int(self.files.read(rel, "memory.current"), 0) or 0)

    def forget(self, rel: str) -> None:
        """The cgroup ended: a new one at the same path starts from zero."""
        self.prev_events.pop(rel, None)

    def inactive_file_bytes(self, rel: str = "") -> int:
        """Idle page cache (memory.stat inactive_file), 0 when not offered."""
        return parse_flat_keyed(self.files.read(rel, "memory.stat")).get("inactive_file", 0)

    def swap_room_bytes(self, host_free_bytes: int, rel: str = "") -> int:
        """Swap the tree can use: the host's free swap, within the cgroup's
        memory.swap.max (absent without swap accounting: the host's)."""
        if host_free_bytes == 0:
            return 0
        cap = self.files.read(rel, "memory.swap.max")
        if cap is None:
            return host_free_bytes
        limit = parse_int(cap)
        if limit is None:
            return host_free_bytes
        used = parse_int(self.files.read(rel, "memory.swap.current"), 0) or 0
        return min(host_free_bytes, max(0, limit - used))
