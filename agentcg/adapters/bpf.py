"""agentcg's BPF programs: find, probe, load, attach, poll, read, destroy.

The only module (with libbpf.py) that touches BPF. The pipeline for every
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
    """The cgroup2 mount point containing `path`."""
    p = Path(os.path.realpath(path))
    best = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                mnt = Path(parts[1])
                if (p == mnt or mnt in p.parents) and (best is None or len(str(mnt)) > len(str(best))):
                    best = mnt
    if best is None:
        raise FileNotFoundError(f"{path} is not on a cgroup2 mount")
    return best


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
        try:
            state = (SCHED_EXT_DIR / "state").read_text().strip()
        except OSError:
            state = "unknown"
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


class Tracker:
    """The process tracker (tracker.bpf.o): events, per-cgroup counters, run-queue latency."""

    def __init__(self, root_cgroup: str | os.PathLike | None, *, runq: bool = True,
                 lb: Libbpf | None = None, obj_dir: Path | None = None, prefer: str = "tp_btf"):
        self._lb = lb or Libbpf.get()
        odir = obj_dir or objects_dir()
        self._files = {"tp_btf": str(odir / "tracker.bpf.o"), "raw_tp": str(odir / "tracker_raw.bpf.o")}
        self.path = self._files[prefer]
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} not built: run `make -C bpf`")
        self.root_cgroup = str(root_cgroup) if root_cgroup else None
        self.runq = runq
        self.flavor = ""
        self.links: list[Link] = []
        self._obj: BpfObject | None = None
        self._rb: RingBuffer | None = None
        self._pending: list[ProcEvent] = []
        self.decode_errors = 0
        self.events = 0
        self.load_notes: list[str] = []
        flavors = [prefer] + [f for f in ("tp_btf", "raw_tp") if f != prefer]
        last: Exception | None = None
        for flavor in flavors:
            try:
                self._open_load(flavor)
                self.flavor = flavor
                break
            except LibbpfError as exc:
                self.load_notes.append(f"{flavor}: {str(exc).splitlines()[0]}")
                last = exc
                self.close()
        else:
            raise last  # type: ignore[misc]
        try:
            for prog in self._obj.programs():
                if prog.autoload:
                    self.links.append(prog.attach())
            self._rb = RingBuffer(self._lb, self._obj.map("events"), self._on_sample)
            self._ncpus = self._lb.num_possible_cpus()
        except Exception:
            self.close()
            raise

    def _open_load(self, flavor: str) -> None:
        self.path = self._files[flavor]
        obj = BpfObject(self._lb, self.path)
        self._obj = obj
        knobs: dict[str, int] = {}
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
        return _percpu_sum(self._obj.map("counters"), idx, self._ncpus)

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

    def close(self) -> None:
        for link in self.links:
            link.destroy()
        self.links = []
        if self._rb is not None:
            self._rb.free()
            self._rb = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NetPolicy:
    """Network intent (netpolicy.bpf.o), attached to one cgroup (effective below it)."""

    def __init__(self, cgroup: str | os.PathLike, *, lb: Libbpf | None = None, obj_dir: Path | None = None):
        self._lb = lb or Libbpf.get()
        self.path = str((obj_dir or objects_dir()) / "netpolicy.bpf.o")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} not built: run `make -C bpf`")
        self.cgroup = str(cgroup)
        self.links: list[Link] = []
        self._obj: BpfObject | None = BpfObject(self._lb, self.path)
        fd = -1
        try:
            self._obj.load()
            self._ncpus = self._lb.num_possible_cpus()
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
        return _percpu_sum(self._obj.map("counters"), T.AGENTCG_CTR_NET_DENIED, self._ncpus)

    def close(self) -> None:
        for link in self.links:
            link.destroy()
        self.links = []
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> "NetPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


class SchedExt:
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
        self._lb = lb or Libbpf.get()
        self.path = str((obj_dir or objects_dir()) / "sched.bpf.o")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} not built: run `make -C bpf`")
        self._obj: BpfObject | None = BpfObject(self._lb, self.path)
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
        if self.link is not None:
            self.link.destroy()
            self.link = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        deadline = time.monotonic() + wait_s
        state = sched_ext_state()
        while state not in (None, "disabled") and time.monotonic() < deadline:
            time.sleep(0.02)
            state = sched_ext_state()
        return state

    def __enter__(self) -> "SchedExt":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attached_names(links: Iterable[Link]) -> list[str]:
    return [l.what for l in links if l.alive]


class BpfHook:
    """agentcgd's eBPF extension (see daemon/hooks.py): process tracking,
    automatic mode, escapes, per-call kernel stats, network intent.

    Built once in daemon/app.py:build(). Everything it cannot load is reported
    in status() with the reason; the daemon works without it.
    """

    name = "bpf"

    def __init__(self, root: str | os.PathLike, *, rules=(), escape_action: str = "keep",
                 runq: bool = True, network: bool = True, sched_ext: bool = True, placement_keep: int = 4096):
        from collections import deque

        from agentcg.core.attribution import Attribution

        self.root = Path(root)
        self.attr = Attribution(rules=rules, escape_action=escape_action)
        self.tracker: Tracker | None = None
        self.net: NetPolicy | None = None
        self.daemon: Any = None
        self.placement_ns: deque[int] = deque(maxlen=placement_keep)
        self.auto_calls = 0
        self.escapes = 0
        self.oom_victims: dict[tuple[str, int | None], list[dict]] = {}
        self._agents: dict[str, int] = {}
        self._cgids: dict[str, int] = {}          # rel path -> cgroup id
        self._escaped: dict[tuple[str, int], dict[int, dict]] = {}
        self.runq, self.network, self.use_sched_ext = runq, network, sched_ext
        self.sched: SchedExt | None = None
        self._sched_ejected: str | None = None
        self._auto_calls: set[tuple[str, int]] = set()
        self._pending_auto: set[int] = set()
        self.started = False
        self.status_ = BpfStatus(reason="not started yet (loads when the daemon listens)")

    def start(self) -> None:
        """Probe, load and attach (the cgroup root must exist). Idempotent."""
        if self.started:
            return
        self.started = True
        runq, network = self.runq, self.network
        self.status_ = probe_host()
        if not self.status_.available:
            return
        feats = self.status_.features
        if feats.get("tracing", Feature("absent")).state == "available" and \
                feats.get("ringbuf", Feature("absent")).state == "available":
            try:
                self.tracker = Tracker(self.root, runq=runq)
                feats["tracker"] = Feature("used", f"{self.tracker.flavor} sched_process_fork/exec/exit, "
                                                   f"mark_victim{', runq latency' if runq else ''}")
            except (LibbpfError, OSError, KeyError) as exc:
                feats["tracker"] = Feature("failed", str(exc).splitlines()[0])
        else:
            feats["tracker"] = Feature("off", "needs tracing programs and ring buffers")
        if network and feats.get("cgroup_bpf", Feature("absent")).state == "available":
            try:
                self.net = NetPolicy(self.root)
                feats["netpolicy"] = Feature("used", "cgroup sock_create/connect/sendmsg/bind + skb counters")
            except (LibbpfError, OSError, KeyError) as exc:
                feats["netpolicy"] = Feature("failed", str(exc).splitlines()[0])
        elif network:
            feats["netpolicy"] = Feature("off", "cgroup BPF programs unavailable: network intent not enforced")
        if os.environ.get("AGENTCG_SCHED_EXT") == "0":
            self.use_sched_ext = False
            if feats.get("sched_ext", Feature("absent")).state == "available":
                feats["sched_ext"] = Feature("off", "disabled by AGENTCG_SCHED_EXT=0")
        if self.use_sched_ext and feats.get("sched_ext", Feature("absent")).state == "available":
            try:
                self.sched = SchedExt()
                feats["sched_ext"] = Feature("used", "agentcg scheduler: cgroup weights and boost from intents")
            except (SchedExtUnavailable, LibbpfError, OSError, KeyError) as exc:
                feats["sched_ext"] = Feature("off", str(exc).splitlines()[0])

    # -- lifecycle hooks ------------------------------------------------------
    def _cgid(self, path: Path) -> int | None:
        try:
            return cgroup_id(path)
        except FileNotFoundError:
            return None

    def on_session_create(self, session, path: Path) -> None:
        for sub, call in ((path, None), (path / "agent", None)):
            cg = self._cgid(sub)
            if cg is not None:
                self.attr.add_cgroup(cg, session.name, call)
                self._set_sched(cg, getattr(session.limits, "cpu_weight", None), False)

    def on_session_end(self, session, path: Path) -> None:
        self.attr.session_ended(session.name)
        self._agents.pop(session.name, None)

    def on_call_start(self, session, call, path: Path) -> None:
        cg = self._cgid(path)
        if cg is None:
            return
        self._cgids[str(path)] = cg
        self.attr.add_cgroup(cg, session.name, call.n)
        self.attr.call_placed(session.name, call.n, [call.pid])
        boost = getattr(call.intent, "cpu_class", None) == "latency" or \
            (session.name, call.n) in self._auto_calls or \
            (self._agents.get(session.name) is not None and call.pid in self._pending_auto)
        self._set_sched(cg, getattr(call.limits, "cpu_weight", None), boost)
        mode = getattr(call.intent, "network", None) or "full"
        if self.net is not None and mode != "full":
            self.net.set_mode(cg, mode)

    def _set_sched(self, cg: int, weight: int | None, boost: bool) -> None:
        if self.sched is None:
            return
        w = max(T.AGENTCG_SCHED_WEIGHT_MIN, min(T.AGENTCG_SCHED_WEIGHT_MAX, int(weight or T.AGENTCG_SCHED_WEIGHT_DFL)))
        try:
            self.sched.set_weight(cg, w, boost)
        except LibbpfError:
            pass

    def on_call_end(self, session, call, path: Path) -> dict[str, Any]:
        cg = self._cgids.pop(str(path), None) or self._cgid(path)
        out: dict[str, Any] = {}
        escapes = self.report_escapes(session, call.n)
        if escapes:
            out["escapes"] = escapes
        if cg is None:
            return out
        if self.tracker is not None:
            st = self.tracker.cg_stats(cg)
            out["proc_count"] = st["forks"] + 1        # the placed root + every process forked in the call
            out["exec_count"] = st["execs"]
            out["oom_kills"] = st["oom_kills"]
            h = self.tracker.runq_hist(cg)
            out["runq_waits"] = h["count"]
            out["runq_p50_us"] = h["p50_ns"] / 1000 if h["p50_ns"] is not None else None
            out["runq_p99_us"] = h["p99_ns"] / 1000 if h["p99_ns"] is not None else None
            self.tracker.forget_cgroup(cg)
        victims = self.oom_victims.pop((session.name, call.n), None)
        if victims:
            out["oom_victims"] = victims
        if self.net is not None:
            ns = self.net.net_stats(cg)
            out["net_tx_bytes"] = ns["tx_bytes"]
            out["net_rx_bytes"] = ns["rx_bytes"]
            out["net_denied"] = ns["denied"]
            self.net.forget(cg)
        if self.sched is not None:
            try:
                self.sched.forget(cg)
            except LibbpfError:
                pass
        self._auto_calls.discard((session.name, call.n))
        self.attr.remove_cgroup(cg)
        self._escaped.pop((session.name, call.n), None)
        return out

    def report_escapes(self, session, n: int) -> list[dict]:
        """Processes of call n still alive now: reported once (event call.escape), kept for the stats."""
        key = (session.name, n)
        seen = self._escaped.setdefault(key, {})
        for e in self.attr.call_ended(session.name, n):
            if e.pid in seen:
                continue
            seen[e.pid] = {"pid": e.pid, "comm": e.comm, "cmdline": e.cmdline, "reparented": e.reparented,
                           "action": e.action, "reason": e.reason}
            self.escapes += 1
            if self.daemon is not None:
                self.daemon.emit({"type": "call.escape", "uid": session.uid, "session": session.name,
                                  "call": n, **seen[e.pid]})
        return list(seen.values())

    def status(self) -> dict[str, Any]:
        st = self.status_
        if self.tracker is not None:
            st.events = self.tracker.events
            st.decode_errors = self.tracker.decode_errors
            try:
                st.lost_events = self.tracker.lost_events
            except LibbpfError:
                pass
        st.attached = attached_names((self.tracker.links if self.tracker else []) +
                                     (self.net.links if self.net else []))
        if self.sched is not None:
            why = self.sched.ejected()
            if why:
                st.features["sched_ext"] = Feature("failed", f"thrown out by the kernel: {why}")
                if self._sched_ejected is None and self.daemon is not None:
                    self.daemon.emit({"type": "bpf.sched_ext.ejected", "uid": 0, "reason": why})
                self._sched_ejected = why
        d = st.as_dict()
        d["processes"] = self.trees()
        d["automatic_mode"] = {"agents": dict(self._agents), "calls": self.auto_calls,
                               "escapes": self.escapes, "placement": self.placement_summary()}
        d["tracked_processes"] = len(self.attr)
        return d

    def trees(self) -> dict[str, dict[str, list]]:
        """Live process trees of running calls, by session then call number."""
        out: dict[str, dict[str, list]] = {}
        if self.daemon is None:
            return out
        for s in list(self.daemon.sessions.values()):
            calls = {str(n): self.attr.tree(s.name, n) for n in list(s.calls)}
            calls = {n: t for n, t in calls.items() if t}
            if calls:
                out[s.name] = calls
        return out

    def placement_summary(self) -> dict[str, Any]:
        xs = sorted(self.placement_ns)
        if not xs:
            return {"count": 0}
        pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] / 1000  # noqa: E731
        return {"count": len(xs), "p50_us": pick(0.50), "p99_us": pick(0.99)}

    def close(self) -> None:
        if self.sched is not None:
            self.sched.close()
            self.sched = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.net is not None:
            self.net.close()
            self.net = None

    # -- the event loop ---------------------------------------------------------
    async def run(self, daemon) -> None:
        import asyncio

        self.daemon = daemon
        self.start()
        for s in list(daemon.sessions.values()):
            self.on_session_create(s, daemon.cgfs.path(s.rel))
            for c in s.calls.values():
                self.on_call_start(s, c, daemon.cgfs.path(c.rel))
        if self.tracker is None:
            return
        loop = asyncio.get_running_loop()
        fd = self.tracker.epoll_fd()
        # events are handled in the reader callback itself: no extra loop iteration
        # between the ring buffer's wakeup and the move into the call cgroup
        loop.add_reader(fd, self._drain, daemon)
        try:
            while True:
                self._sync_agents(daemon)
                self._drain(daemon)
                await asyncio.sleep(0.1)
        finally:
            loop.remove_reader(fd)

    def _drain(self, daemon) -> None:
        if self.tracker is None:
            return
        try:
            events = self.tracker.poll(0)
        except LibbpfError:
            return
        for ev in events:
            for d in self.attr.feed(ev):
                try:
                    self._apply(daemon, d)
                except Exception:  # one bad decision must not stop the tracker
                    import logging
                    logging.getLogger("agentcg.bpf").exception("applying %s failed", d)

    def _sync_agents(self, daemon) -> None:
        """Sessions with attached agent pids are in automatic mode."""
        for s in list(daemon.sessions.values()):
            agents = [pid for pid in s.attached if os.path.exists(f"/proc/{pid}")]
            cur = self._agents.get(s.name)
            if agents and cur not in agents:
                cg = self._cgid(daemon.cgfs.path(f"{s.rel}/agent"))
                if cg is not None:
                    self.attr.add_cgroup(cg, s.name, None)
                    self.attr.register_agent(s.name, agents[0], cg)
                    self._agents[s.name] = agents[0]

    def place_new_call(self, daemon, d) -> int | None:
        """Automatic mode: a fresh tool call for d.root_pid, then its early descendants."""
        import time

        from agentcg.core.intents import Intent

        s = daemon.sessions.get(d.session)
        if s is None:
            return None
        seen_ns = time.monotonic_ns()
        self._pending_auto.add(d.root_pid)
        try:
            started = daemon.start_call(s, pid=d.root_pid, name=d.program, argv=[d.cmdline],
                                        intent=Intent.parse(dict(d.intent)))
        except Exception as exc:  # the process may be gone already
            daemon.emit({"type": "call.auto.failed", "uid": s.uid, "session": d.session, "pid": d.root_pid,
                         "reason": str(exc)})
            return None
        finally:
            self._pending_auto.discard(d.root_pid)
        n = started.call.n
        self._auto_calls.add((d.session, n))
        placed_ns = time.monotonic_ns()
        for pid in d.pids[1:]:
            # forked by the agent before placement: moved, and still protected from the OOM killer
            daemon.place_in_call(s, n, pid)
        self.attr.call_placed(d.session, n, d.pids, root_pid=d.root_pid)
        self.placement_ns.append(max(0, placed_ns - d.exec_ts_ns))
        self.auto_calls += 1
        daemon.emit({"type": "call.auto", "uid": s.uid, "session": d.session, "call": n, "pid": d.root_pid,
                     "pids": list(d.pids), "command": d.cmdline, "reason": d.reason,
                     "placement_us": (placed_ns - d.exec_ts_ns) / 1000,
                     "seen_us": (seen_ns - d.exec_ts_ns) / 1000,
                     "call_start_us": (placed_ns - seen_ns) / 1000})
        return n

    def _apply(self, daemon, d) -> None:
        import asyncio

        from agentcg.core.attribution import CallFinished, MoveToCall, NewCall, OomVictim

        if isinstance(d, NewCall):
            self.place_new_call(daemon, d)
        elif isinstance(d, MoveToCall):
            s = daemon.sessions.get(d.session)
            if s is not None:
                daemon.place_in_call(s, d.call, d.pid)
        elif isinstance(d, CallFinished):
            s = daemon.sessions.get(d.session)
            c = s.calls.get(d.call) if s else None
            if c is not None:
                self.report_escapes(s, d.call)   # before the daemon's straggler policy acts
                try:
                    status = os.waitstatus_to_exitcode(d.exit_code)
                except ValueError:
                    status = None
                asyncio.ensure_future(daemon.end_call(s, c, exit_status=status, reason=d.reason))
        elif isinstance(d, OomVictim):
            self.oom_victims.setdefault((d.session, d.call), []).append(
                {"pid": d.pid, "comm": d.comm, "ts_ns": d.ts_ns})
            s = daemon.sessions.get(d.session)
            daemon.emit({"type": "oom.kill", "uid": s.uid if s else 0, "session": d.session, "call": d.call,
                         "pid": d.pid, "comm": d.comm})
