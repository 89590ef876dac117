"""The [worker] and [gpu] tables of agentcgd's configuration.

[worker]: the inference worker agentcgd starts as its child (or attaches
to). [gpu]: NVML sampling, the `gpu_memory` admission budget
(agentcg.core.gpu_budget) and the KV placement cost model
(agentcg.core.kv_placement). Every key has a default; errors name the
field (`worker.port: 70000 is not a port (0..65535)`). See docs/gpu.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from agentcg.units import UnitError, parse_bytes

WORKER_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class WorkerConfig:
    """[worker]. enabled with a model: agentcgd starts the worker in <root>/worker
    and restarts it when it dies; enabled with model = "": it attaches to the
    worker already listening on control_socket."""
    enabled: bool = False
    model: str = ""                 # a shape name (tiny, llama3-8b) or a checkpoint directory
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000                # 0: the worker picks a free one (shown by status)
    gpu_memory_fraction: float = 0.9
    gpu_blocks: int = 0             # 0: the worker's default (from gpu_memory_fraction)
    host_blocks: int = 0            # 0: the worker's default (8 GiB worth)
    control_socket: str = ""        # "" -> <daemon.runtime_dir>/worker.sock
    memory_max_bytes: int | None = None   # memory.max of <root>/worker (its pinned host pool counts)
    restart_backoff_s: float = 1.0  # first restart delay; doubled per crash in a row
    restart_backoff_max_s: float = 60.0
    stable_after_s: float = 60.0    # a worker up this long resets the backoff
    start_timeout_s: float = 120.0  # how long a start may take to answer ping
    args: tuple[str, ...] = ()      # more agentcg-worker options, as written

    @property
    def attach(self) -> bool:
        return self.enabled and not self.model

    def socket_in(self, runtime_dir: str) -> str:
        return self.control_socket or f"{runtime_dir.rstrip('/')}/worker.sock"


@dataclass(frozen=True)
class GpuSettings:
    """[gpu]: sampling, admission and placement knobs. `budget()` and
    `placement()` give the core's config objects."""
    enabled: bool = True            # sample NVML (absent hosts report why and carry on)
    sample_interval_ms: int = 1000
    admit_timeout_s: float = 60.0   # the longest a call.start waits for GPU memory
    enforce: str = "report"
    on_no_room: str = "queue"
    headroom_bytes: int = 256 << 20
    overuse_tolerance_pct: int = 10
    kv_keep_below_s: float = 1.0
    kv_pressure_free_fraction: float = 0.25
    kv_payback_ratio: float = 4.0
    kv_low_priority_max: int = 4
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def budget(self) -> Any:
        from agentcg.core.gpu_budget import GpuConfig
        return GpuConfig(enforce=self.enforce, on_no_room=self.on_no_room, headroom_bytes=self.headroom_bytes,
                         overuse_tolerance_pct=self.overuse_tolerance_pct)

    def placement(self) -> Any:
        from agentcg.core.kv_placement import PlacementConfig
        return PlacementConfig(keep_below_s=self.kv_keep_below_s,
                               pressure_free_fraction=self.kv_pressure_free_fraction,
                               payback_ratio=self.kv_payback_ratio, low_priority_max=self.kv_low_priority_max)


def _err(where: str, value: Any, why: str) -> Exception:
    from agentcg.core.config import ConfigError
    return ConfigError(where, value, why)


def _table(tbl: Any, name: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(tbl, Mapping):
        raise _err(name, tbl, "is not a table")
    for k in tbl:
        if k not in known:
            raise _err(f"{name}.{k}", tbl[k], f"is not a known key (known: {', '.join(known)})")
    return tbl


def _bool(tbl: Mapping[str, Any], where: str, key: str, default: bool) -> bool:
    v = tbl.get(key, default)
    if not isinstance(v, bool):
        raise _err(f"{where}.{key}", v, "is not true or false")
    return v


def _num(tbl: Mapping[str, Any], where: str, key: str, default: float, lo: float, hi: float,
         integer: bool = False) -> Any:
    v = tbl.get(key, default)
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise _err(f"{where}.{key}", v, f"is not {kind} in {lo:g}..{hi:g}")
    return v if integer else float(v)


def _str(tbl: Mapping[str, Any], where: str, key: str, default: str) -> str:
    v = tbl.get(key, default)
    if not isinstance(v, str):
        raise _err(f"{where}.{key}", v, "is not a string")
    return v


_WORKER_KEYS = ("enabled", "model", "device", "host", "port", "gpu_memory_fraction", "gpu_blocks",
                "host_blocks", "control_socket", "memory_max", "restart_backoff_s", "restart_backoff_max_s",
                "stable_after_s", "start_timeout_s", "args")


def parse_worker(tbl: Any) -> WorkerConfig:
    w = "worker"
    _table(tbl, w, _WORKER_KEYS)
    d = WorkerConfig()
    device = _str(tbl, w, "device", d.device)
    if device not in WORKER_DEVICES:
        raise _err("worker.device", device, f"is not one of {'|'.join(WORKER_DEVICES)}")
    sock = _str(tbl, w, "control_socket", d.control_socket)
    if sock and not sock.startswith("/"):
        raise _err("worker.control_socket", sock, "is not an absolute path")
    mem = tbl.get("memory_max")
    mem_bytes = None
    if mem is not None:
        try:
            mem_bytes = parse_bytes(mem)
        except UnitError:
            raise _err("worker.memory_max", mem, "is not a size (e.g. 16G)") from None
    args = tbl.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise _err("worker.args", args, "is not a list of strings")
    frac = _num(tbl, w, "gpu_memory_fraction", d.gpu_memory_fraction, 0.0, 1.0)
    if frac <= 0:
        raise _err("worker.gpu_memory_fraction", frac, "must be above 0")
    backoff = _num(tbl, w, "restart_backoff_s", d.restart_backoff_s, 0.0, 3600.0)
    cfg = WorkerConfig(
        enabled=_bool(tbl, w, "enabled", d.enabled), model=_str(tbl, w, "model", d.model), device=device,
        host=_str(tbl, w, "host", d.host), port=_num(tbl, w, "port", d.port, 0, 65535, integer=True),
        gpu_memory_fraction=frac,
        gpu_blocks=_num(tbl, w, "gpu_blocks", d.gpu_blocks, 0, 1 << 30, integer=True),
        host_blocks=_num(tbl, w, "host_blocks", d.host_blocks, 0, 1 << 30, integer=True),
        control_socket=sock, memory_max_bytes=mem_bytes, restart_backoff_s=backoff,
        restart_backoff_max_s=_num(tbl, w, "restart_backoff_max_s", max(backoff, d.restart_backoff_max_s),
                                   backoff, 86400.0),
        stable_after_s=_num(tbl, w, "stable_after_s", d.stable_after_s, 0.0, 86400.0),
        start_timeout_s=_num(tbl, w, "start_timeout_s", d.start_timeout_s, 1.0, 3600.0),
        args=tuple(args))
    return cfg


_GPU_KEYS = ("enabled", "sample_interval_ms", "admit_timeout_s", "enforce", "on_no_room", "headroom",
             "overuse_tolerance_pct", "kv_keep_below_s", "kv_pressure_free_fraction", "kv_payback_ratio",
             "kv_low_priority_max")
_BUDGET_KEYS = ("enforce", "on_no_room", "headroom", "overuse_tolerance_pct")


def parse_gpu(tbl: Any) -> GpuSettings:
    g = "gpu"
    _table(tbl, g, _GPU_KEYS)
    from agentcg.core.gpu_budget import GpuConfig
    budget = GpuConfig.from_mapping({k: v for k, v in tbl.items() if k in _BUDGET_KEYS})
    d = GpuSettings()
    cfg = GpuSettings(
        enabled=_bool(tbl, g, "enabled", d.enabled),
        sample_interval_ms=_num(tbl, g, "sample_interval_ms", d.sample_interval_ms, 50, 3_600_000, integer=True),
        admit_timeout_s=_num(tbl, g, "admit_timeout_s", d.admit_timeout_s, 0.0, 86400.0),
        enforce=budget.enforce, on_no_room=budget.on_no_room, headroom_bytes=budget.headroom_bytes,
        overuse_tolerance_pct=budget.overuse_tolerance_pct,
        kv_keep_below_s=_num(tbl, g, "kv_keep_below_s", d.kv_keep_below_s, 0.0, 86400.0),
        kv_pressure_free_fraction=_num(tbl, g, "kv_pressure_free_fraction", d.kv_pressure_free_fraction, 0.0, 1.0),
        kv_payback_ratio=_num(tbl, g, "kv_payback_ratio", d.kv_payback_ratio, 1.0, 1000.0),
        kv_low_priority_max=_num(tbl, g, "kv_low_priority_max", d.kv_low_priority_max, 0, 10, integer=True),
        raw=dict(tbl))
    return cfg
