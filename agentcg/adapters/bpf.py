"""agentcg's BPF programs: find, probe, load, attach, poll, read, destroy.

The only module (with libbpf.py) that touches BPF. It holds the loaders
(`Tracker`, `NetPolicy`, `SchedExt`, each a `Loaded` object file) and the
host probe (`probe_host`); what the daemon does with them (automatic mode,
per-call kernel stats, network intent, scheduler weights) is daemon/automatic.py. The pipeline for every
object is: open -> set `const volatile` knobs -> probe what this kernel can
run and switch the rest off -> load -> attach -> poll (lost events counted
in-kernel when the ring buffer is full) -> destroy.

If BPF is unavailable (no libbpf, no BTF, not root, objects not built), the
loader says so in :class:`BpfStatus` and the daemon keeps working from
cgroupfs alone.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agentcg.adapters import bpf_types as T
from agentcg.adapters.hierarchy import mount_of
from agentcg.adapters.libbpf import (
    BPF_MAP_TYPE_RINGBUF,
    BPF_PROG_TYPE_CGROUP_SKB,
    BPF_PROG_TYPE_CGROUP_SOCK,
    BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BpfObject,
    Libbpf,
    LibbpfError,
    LibbpfUnavailable,
    Link,
    RingBuffer,
    VmlinuxBtf,
)
from agentcg.adapters.stopguard import StoppedMap, sweep
from agentcg.core.attribution import ProcEvent

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
SCHED_EXT_DIR = Path("/sys/kernel/sched_ext")


def objects_dir() -> Path:
    """Where the built .bpf.o files are: $AGENTCG_BPF_DIR, the source tree's
    bpf/.output, or the installed agentcg/bpf_objs."""
    env = os.environ.get("AGENTCG_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    src = here.parents[2] / "bpf" / ".output"
    if src.is_dir():
        return src
    return here.parents[1] / "bpf_objs"


def cgroup_id(path: str | os.PathLike) -> int:
    """cgroup v2 id of a cgroup directory: its inode number."""
    return os.stat(path).st_ino


def cgroup2_mount_of(path: str | os.PathLike) -> Path:
    """The cgroup2 mount point containing `path` (the mount table read through procfs)."""
    best = mount_of(os.path.realpath(path))
    if best is None:
        raise FileNotFoundError(f"{path} is not on a cgroup2 mount")
    return Path(best)


def cgroup_level(path: str | os.PathLike) -> int:
    """Depth of a cgroup below its cgroup2 root (the root is level 0)."""
    p = Path(os.path.realpath(path))
    return len(p.relative_to(cgroup2_mount_of(p)).parts)


@dataclass
class Feature:
    state: str        # "used" | "available" | "absent" | "off" | "failed"
    detail: str = ""

    def as_dict(self) -> dict:
        return {"state": self.state, "detail": self.detail}


@dataclass
class BpfStatus:
    """What BPF does on this host, and why not where it does not."""

    available: bool = False
    reason: str = ""
    libbpf: str = ""
    objects_dir: str = ""
    features: dict[str, Feature] = field(default_factory=dict)
    attached: list[str] = field(default_factory=list)
    events: int = 0
    lost_events: int = 0
    decode_errors: int = 0

    def as_dict(self) -> dict:
        return {
            "available": self.available,
            "reason": self.reason,
            "libbpf": self.libbpf,
            "objects_dir": self.objects_dir,
            "features": {k: v.as_dict() for k, v in sorted(self.features.items())},
            "attached": list(self.attached),
            "events": self.events,
            "lost_events": self.lost_events,
            "decode_errors": self.decode_errors,
        }


def probe_host(lb: Libbpf | None = None) -> BpfStatus:
    """Detect BPF support without loading anything of ours."""
    st = BpfStatus(objects_dir=str(objects_dir()))
    if lb is None:
        try:
            lb = Libbpf.get()
        except LibbpfUnavailable as exc:
            st.reason = str(exc)
            return st
    st.libbpf = lb.version_str
    if not VMLINUX_BTF.exists():
        st.reason = f"kernel has no BTF ({VMLINUX_BTF} missing): CO-RE programs cannot load"
        return st
    if os.geteuid() != 0:
        st.reason = "not root: loading BPF programs needs CAP_BPF/CAP_SYS_ADMIN"
        return st
    f = st.features
    # libbpf cannot probe BPF_PROG_TYPE_TRACING (tp_btf) without a BTF target: raw_tp is
    # probed here, and the tracker tries tp_btf first at load, falling back to raw_tp.
    f["tracing"] = Feature("available" if lb.probe_prog_type(BPF_PROG_TYPE_RAW_TRACEPOINT) else "absent",
                           "raw tracepoint programs (tp_btf tried first at load)")
    f["ringbuf"] = Feature("available" if lb.probe_map_type(BPF_MAP_TYPE_RINGBUF) else "absent",
                           "BPF ring buffer (5.8+)")
    cg_ok = all(lb.probe_prog_type(t) for t in (BPF_PROG_TYPE_CGROUP_SOCK, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                                                  BPF_PROG_TYPE_CGROUP_SKB))
    f["cgroup_bpf"] = Feature("available" if cg_ok else "absent", "cgroup sock/sock_addr/skb programs")
    if SCHED_EXT_DIR.is_dir():
        state = sched_ext_state() or "unknown"
        f["sched_ext"] = Feature("available", f"/sys/kernel/sched_ext/state = {state}")
    else:
        f["sched_ext"] = Feature("absent", "kernel built without CONFIG_SCHED_CLASS_EXT")
    try:
        with VmlinuxBtf(lb) as btf:
            has = btf.has_struct("memcg_bpf_ops")
        f["memcg_bpf_ops"] = Feature("available" if has else "absent",
                                     "struct memcg_bpf_ops in kernel BTF" if has else
                                     "struct memcg_bpf_ops not in kernel BTF (unmerged patch series): nothing assumed")
    except LibbpfError as exc:
        f["memcg_bpf_ops"] = Feature("failed", str(exc).splitlines()[0])
    st.available = True
    return st


def _percpu_sum(obj_map, idx: int, ncpus: int) -> int:
    arr = (ctypes.c_uint64 * ncpus)()
    if not obj_map.lookup(ctypes.c_uint32(idx), arr):
        return 0
    return int(sum(arr))


class Loaded:
    """One built BPF object file, the open -> load -> attach -> close pattern
    every loader shares: the file is found (or FileNotFoundError says how to
    build it), `_open` opens it, the subclass sets knobs, loads and attaches
    (each link in `links`), and close() (also on any failure part-way)
    destroys the links, then what `_release` frees, then the object."""

    def __init__(self, filename: str, *, lb: Libbpf | None = None, obj_dir: Path | None = None):
        self._lb = lb or Libbpf.get()
        self._dir = obj_dir or objects_dir()
        self.path = self._find(filename)
        self.links: list[Any] = []
        self._obj: BpfObject | None = None
        self._ncpus: int | None = None

    def _find(self, filename: str) -> str:
        path = str(self._dir / filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not built: run `make -C bpf`")
        return path

    def _open(self) -> BpfObject:
        self._obj = BpfObject(self._lb, self.path)
        return self._obj

    def _percpu(self, idx: int) -> int:
        """Counter idx of the object's per-CPU "counters" map, summed over CPUs."""
        if self._ncpus is None:
            self._ncpus = self._lb.num_possible_cpus()
        return _percpu_sum(self._obj.map("counters"), idx, self._ncpus)

    def _release(self) -> None:
        """What a subclass holds besides links and the object (after the links go)."""

    def close(self) -> None:
        for link in self.links:
            link.destroy()
        self.links = []
        self._release()
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Tracker(Loaded):
    """The process tracker (tracker.bpf.o): events, per-cgroup counters, run-queue latency."""

    def __init__(self, root_cgroup: str | os.PathLike | None, *, runq: bool = True,
                 lb: Libbpf | None = None, obj_dir: Path | None = None, prefer: str = "tp_btf",
                 stop: bool = True):
        names = {"tp_btf": "tracker.bpf.o", "raw_tp": "tracker_raw.bpf.o"}
        super().__init__(names[prefer], lb=lb, obj_dir=obj_dir)
        self._files = {flavor: str(self._dir / name) for flavor, name in names.items()}
        self.root_cgroup = str(root_cgroup) if root_cgroup else None
        self.runq = runq
        self.flavor = ""
        self._rb: RingBuffer | None = None
        self._pending: list[ProcEvent] = []
        self.decode_errors = 0
        self.events = 0
        self.load_notes: list[str] = []
        self.stop_supported = False   # the loaded object may bpf_send_signal(SIGSTOP) at exec
        flavors = [prefer] + [f for f in ("tp_btf", "raw_tp") if f != prefer]
        # with the stop first; a kernel that refuses bpf_send_signal here gets the object without it
        tries = [(f, st) for f in flavors for st in ((True, False) if stop else (False,))]
        last: Exception | None = None
        for flavor, with_stop in tries:
            try:
                self._open_load(flavor, with_stop)
                self.flavor, self.stop_supported = flavor, with_stop
                break
            except LibbpfError as exc:
                self.load_notes.append(f"{flavor}{' with stop' if with_stop else ''}: {str(exc).splitlines()[0]}")
                last = exc
                self.close()
        else:
            raise last  # type: ignore[misc]
        try:
            for prog in self._obj.programs():
                if prog.autoload:
                    self.links.append(prog.attach())
            self._rb = RingBuffer(self._lb, self._obj.map("events"), self._on_sample)
        except Exception:
            self.close()
            raise

    def _open_load(self, flavor: str, with_stop: bool) -> None:
        self.path = self._files[flavor]
        obj = self._open()
        knobs: dict[str, int] = {"stop_allowed": int(with_stop)}
        if self.root_cgroup:
            knobs["filter_cgid"] = cgroup_id(self.root_cgroup)
            knobs["filter_level"] = cgroup_level(self.root_cgroup)
        obj.set_knobs(**knobs)
        for prog in obj.programs():
            keep = prog.section.startswith(flavor + "/")
            if not self.runq and any(s in prog.section for s in ("sched_wakeup", "sched_switch")):
                keep = False
            prog.set_autoload(keep)
        obj.load()

    def _on_sample(self, data: bytes) -> None:
        try:
            self._pending.append(T.decode_event(data))
            self.events += 1
        except T.EventDecodeError:
            self.decode_errors += 1

    def poll(self, timeout_ms: int = 0) -> list[ProcEvent]:
        """Events since the last call (waits up to timeout_ms for the first)."""
        if self._rb is None:
            return []
        if timeout_ms > 0:
            self._rb.poll(timeout_ms)
        else:
            self._rb.consume()
        out, self._pending = self._pending, []
        return out

    def epoll_fd(self) -> int:
        if self._rb is None:
            raise RuntimeError("tracker is closed")
        return self._rb.epoll_fd()

    def counter(self, idx: int) -> int:
        return self._percpu(idx)

    @property
    def lost_events(self) -> int:
        return self.counter(T.AGENTCG_CTR_RINGBUF_DROPS)

    def cg_stats(self, cgid: int) -> dict[str, int]:
        v = T.AgentcgCgStats()
        if not self._obj.map("cg_stats").lookup(ctypes.c_uint64(cgid), v):
            return {"forks": 0, "execs": 0, "exits": 0, "oom_kills": 0}
        return {"forks": v.forks, "execs": v.execs, "exits": v.exits, "oom_kills": v.oom_kills}

    def runq_hist(self, cgid: int) -> dict[str, Any]:
        """{"count", "sum_ns", "slots", "p50_ns", "p99_ns"} for a cgroup (zeros if none)."""
        h = T.AgentcgRunqHist()
        if not self._obj.map("runq_hist").lookup(ctypes.c_uint64(cgid), h):
            return {"count": 0, "sum_ns": 0, "slots": [0] * T.AGENTCG_RUNQ_SLOTS, "p50_ns": None, "p99_ns": None}
        slots = [int(x) for x in h.slots]
        return {"count": int(h.count), "sum_ns": int(h.sum_ns), "slots": slots,
                "p50_ns": T.hist_percentile_ns(slots, 50), "p99_ns": T.hist_percentile_ns(slots, 99)}

    def forget_cgroup(self, cgid: int) -> None:
        """Drop a removed cgroup's counters (ids are not reused while the daemon runs, but maps are bounded)."""
        key = ctypes.c_uint64(cgid)
        for name in ("cg_stats", "runq_hist"):
            try:
                self._obj.map(name).delete(key)
            except LibbpfError:
                pass

    # -- stop until placed (automatic mode; see agentcg/adapters/stopguard.py) ----
    def set_agent(self, cgid: int, tgid: int) -> None:
        """Direct children of `tgid` exec'ing in cgroup `cgid` are stopped at exec (while enabled)."""
        self._obj.map("agent_cgs").update(ctypes.c_uint64(cgid), T.AgentcgAgent(tgid=tgid))

    def forget_agent(self, cgid: int) -> None:
        try:
            self._obj.map("agent_cgs").delete(ctypes.c_uint64(cgid))
        except LibbpfError:
            pass

    def set_stop(self, on: bool) -> None:
        """The in-kernel switch: on only while the daemon consumes events and its watchdog runs."""
        if on and not self.stop_supported:
            raise RuntimeError("this tracker was loaded without the stop (bpf_send_signal refused)")
        self._obj.map("stop_ctl").update(ctypes.c_uint32(0), ctypes.c_uint32(int(on)))

    def stopped_map_fd(self) -> int:
        return self._obj.map("stopped").fd

    def stopped(self) -> StoppedMap:
        return StoppedMap(self._lb.lib, self.stopped_map_fd())

    def close(self) -> None:
        # nothing may stay stopped once the hooks are gone: switch off, continue all, then detach
        if self._obj is not None and self.stop_supported and self.links:
            try:
                self.set_stop(False)
                sweep(self.stopped(), 0)
            except (LibbpfError, OSError):
                pass
        super().close()

    def _release(self) -> None:
        if self._rb is not None:
            self._rb.free()
            self._rb = None


class NetPolicy(Loaded):
    """Network intent (netpolicy.bpf.o), attached to one cgroup (effective below it)."""

    def __init__(self, cgroup: str | os.PathLike, *, lb: Libbpf | None = None, obj_dir: Path | None = None):
        super().__init__("netpolicy.bpf.o", lb=lb, obj_dir=obj_dir)
        self.cgroup = str(cgroup)
        self._open()
        fd = -1
        try:
            self._obj.load()
            fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            for prog in self._obj.programs():
                self.links.append(prog.attach_cgroup(fd))
        except Exception:
            self.close()
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def set_mode(self, cgid: int, mode: str) -> None:
        if mode not in T.NET_MODES:
            raise ValueError(f"network={mode!r}: expected one of {sorted(T.NET_MODES)}")
        key = ctypes.c_uint64(cgid)
        if T.NET_MODES[mode] == T.AGENTCG_NET_FULL:
            self._obj.map("net_mode").delete(key)
        else:
            self._obj.map("net_mode").update(key, ctypes.c_uint32(T.NET_MODES[mode]))

    def net_stats(self, cgid: int) -> dict[str, int]:
        v = T.AgentcgNetStats()
        names = [f[0] for f in T.AgentcgNetStats._fields_]
        if not self._obj.map("net_stats").lookup(ctypes.c_uint64(cgid), v):
            return {n: 0 for n in names}
        return {n: int(getattr(v, n)) for n in names}

    def forget(self, cgid: int) -> None:
        key = ctypes.c_uint64(cgid)
        for name in ("net_mode", "net_stats"):
            try:
                self._obj.map(name).delete(key)
            except LibbpfError:
                pass

    @property
    def denied_total(self) -> int:
        return self._percpu(T.AGENTCG_CTR_NET_DENIED)


class SchedExtUnavailable(RuntimeError):
    """sched_ext cannot be used here; the message says why."""


def sched_ext_state() -> str | None:
    """/sys/kernel/sched_ext/state ("disabled", "enabled", ...) or None without sched_ext."""
    try:
        return (SCHED_EXT_DIR / "state").read_text().strip()
    except OSError:
        return None


def sched_ext_ops() -> str | None:
    """Name of the loaded sched_ext scheduler, or None."""
    try:
        return (SCHED_EXT_DIR / "root" / "ops").read_text().strip() or None
    except OSError:
        return None


class SchedExt(Loaded):
    """The cgroup-aware sched_ext scheduler (sched.bpf.o).

    Loads only where /sys/kernel/sched_ext exists and its state is
    "disabled" (no other sched_ext scheduler). Weights per cgroup id come from
    set_weight(); ejected() says when the kernel threw the scheduler out (the
    watchdog, an error) and why.
    """

    def __init__(self, *, lb: Libbpf | None = None, obj_dir: Path | None = None, slice_ns: int | None = None):
        state = sched_ext_state()
        if state is None:
            raise SchedExtUnavailable("kernel has no sched_ext (/sys/kernel/sched_ext missing)")
        if state != "disabled":
            raise SchedExtUnavailable(f"another sched_ext scheduler is active "
                                      f"(state {state!r}, ops {sched_ext_ops()!r}): not loading ours")
        super().__init__("sched.bpf.o", lb=lb, obj_dir=obj_dir)
        self._open()
        self.link: Any = None
        try:
            if slice_ns is not None:
                self._obj.set_knobs(slice_ns=slice_ns)
            # ops.init calls scx_bpf_create_dsq, a sleepable kfunc; libbpf 1.1 has no
            # "struct_ops.s/" section, so the flag is set here
            self._obj.program("agentcg_init").set_sleepable()
            # link-based registration: if the daemon dies, the kernel unloads the scheduler
            ops = self._obj.map("agentcg_ops")
            ops.set_link_flag()
            self._obj.load()
            self.link = ops.attach_struct_ops_link()
            self.links.append(self.link)
        except Exception:
            self.close()
            raise

    def set_weight(self, cgid: int, weight: int, boost: bool = False) -> None:
        if not T.AGENTCG_SCHED_WEIGHT_MIN <= weight <= T.AGENTCG_SCHED_WEIGHT_MAX:
            raise ValueError(f"weight={weight}: expected {T.AGENTCG_SCHED_WEIGHT_MIN}.."
                             f"{T.AGENTCG_SCHED_WEIGHT_MAX}")
        self._obj.map("sched_cg").update(ctypes.c_uint64(cgid), T.AgentcgSchedCg(weight=weight, boost=int(boost)))

    def forget(self, cgid: int) -> None:
        self._obj.map("sched_cg").delete(ctypes.c_uint64(cgid))

    def exit_info(self) -> dict[str, Any]:
        kind = int.from_bytes(self._obj.read_global("exit_kind"), "little", signed=True)
        code = int.from_bytes(self._obj.read_global("exit_code"), "little", signed=True)
        reason = self._obj.read_global("exit_reason").split(b"\0", 1)[0].decode(errors="replace")
        return {"kind": kind, "code": code, "reason": reason}

    def ejected(self) -> str | None:
        """None while ours runs; else why it stopped (the kernel's exit reason)."""
        if self.link is None:
            return "not loaded"
        state, ops = sched_ext_state(), sched_ext_ops()
        if state == "enabled" and ops == "agentcg":
            return None
        info = self.exit_info()
        return (f"sched_ext state {state!r}, ops {ops!r}: exit kind {info['kind']}"
                f"{': ' + info['reason'] if info['reason'] else ''}")

    def close(self, wait_s: float = 5.0) -> str | None:
        """Unload; returns the sched_ext state afterwards."""
        import time
        super().close()
        self.link = None
        deadline = time.monotonic() + wait_s
        state = sched_ext_state()
        while state not in (None, "disabled") and time.monotonic() < deadline:
            time.sleep(0.02)
            state = sched_ext_state()
        return state



def attached_names(links: Iterable[Link]) -> list[str]:
    return [l.what for l in links if l.alive]
