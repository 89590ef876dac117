"""The policy's view of a cgroup read from its interface files (a fake tree
of plain files): CgroupFs.read_view by path, and the ViewReader that the
policy loop reads through kept-open descriptors, with memory.events deltas."""
from __future__ import annotations

from pathlib import Path

from agentcg.adapters.cgroupfs import CgroupFs, OpenFiles
from agentcg.adapters.cgroupview import ViewReader, parse_flat_keyed, parse_int
from agentcg.core.policy import MemEvents, Psi, TriggerEvent

M = 1 << 20
PRESSURE = ("some avg10=1.50 avg60=0.00 avg300=0.00 total=120000\n"
            "full avg10=0.25 avg60=0.00 avg300=0.00 total=30000\n")


def write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (d / k.replace("__", ".")).write_text(v)


def events(low=0, high=0, mx=0, oom=0, oom_kill=0) -> str:
    return f"low {low}\nhigh {high}\nmax {mx}\noom {oom}\noom_kill {oom_kill}\n"


def test_read_view_parses_every_field_by_path(tmp_path):
    write(tmp_path / "s-a" / "c-1", memory__current=f"{50 * M}\n", memory__high=f"{64 * M}\n",
          memory__max="max\n", memory__low="0\n", memory__pressure=PRESSURE, memory__events=events(high=3),
          cgroup__freeze="1\n", cpu__weight="200\n", cpu__max="25000 100000\n")
    v = CgroupFs(tmp_path).read_view("s-a/c-1")
    assert (v.path, v.memory_current_bytes, v.memory_high_bytes, v.memory_max_bytes, v.memory_low_bytes) == \
        ("s-a/c-1", 50 * M, 64 * M, None, 0)
    assert v.psi == Psi(1.5, 0.25, 120000, 30000)
    assert v.frozen and v.cpu_weight == 200 and v.cpu_max == "25000 100000"
    assert v.events_delta == MemEvents()   # a single reading has no delta


def test_read_view_of_missing_files_is_unlimited_and_unfrozen(tmp_path):
    write(tmp_path / "s-a", memory__current=f"{M}\n")
    v = CgroupFs(tmp_path).read_view("s-a")
    assert (v.memory_current_bytes, v.memory_high_bytes, v.memory_max_bytes, v.frozen, v.cpu_max) == \
        (M, None, None, False, None)
    assert v.psi == Psi()


def test_view_reader_carries_memory_events_growth_through_kept_open_files(tmp_path):
    cg = tmp_path / "s-a" / "c-1"
    write(cg, memory__current="0\n", memory__events=events(high=2, oom=1))
    files = OpenFiles(CgroupFs(tmp_path))
    views = ViewReader(files)
    try:
        trig = (TriggerEvent("some", 38_000, 500_000),)
        first = views.read_view("s-a/c-1", trig)
        assert first.events_delta == MemEvents() and first.triggers == trig
        write(cg, memory__events=events(high=7, oom=1, oom_kill=1))
        assert views.read_view("s-a/c-1").events_delta == MemEvents(high=5, oom_kill=1)
        assert files.open_count() >= 2      # read through descriptors kept open
        assert views.read_view("s-a/c-1").events_delta == MemEvents()
        write(cg, memory__events=events(high=1))  # counters went back: the cgroup was made again
        assert views.read_view("s-a/c-1").events_delta == MemEvents(high=1)
        views.forget("s-a/c-1")
        assert views.read_view("s-a/c-1").events_delta == MemEvents()
    finally:
        files.close()


def test_view_reader_host_idle_cache_and_swap_room(tmp_path):
    write(tmp_path, memory__stat="anon 100\ninactive_file 4096\n")
    views = ViewReader(CgroupFs(tmp_path))
    assert views.inactive_file_bytes() == 4096
    assert views.swap_room_bytes(0) == 0
    assert views.swap_room_bytes(8 * M) == 8 * M           # no swap accounting: the host's
    write(tmp_path, memory__swap__max=f"{4 * M}\n", memory__swap__current=f"{3 * M}\n")
    assert views.swap_room_bytes(8 * M) == 1 * M
    write(tmp_path, memory__swap__max="max\n")
    assert views.swap_room_bytes(8 * M) == 8 * M


def test_parsers():
    assert parse_int("max\n") is None and parse_int(None, 0) == 0 and parse_int(" 42\n") == 42
    assert parse_int("x", 7) == 7
    assert parse_flat_keyed("a 1\nb x\nc 2 3\nd 4\n") == {"a": 1, "d": 4}
