"""The only code that imports pynvml (nvidia-ml-py, the `gpu` extra).

`Nvml().read()` returns a `GpuSnapshot` (agentcg.core.gpu_budget): each
device's total/used/free memory and every process with a context on it,
compute and graphics alike, with its GPU memory and its cgroup v2 path. A
host without a GPU, without the NVIDIA driver or without nvidia-ml-py gives a
snapshot with `absent_reason` set; nothing here raises. A failure on one
device (a GPU that fell off the bus) or one query (process lists are not
supported under some vGPU setups) is listed in `errors` and the rest is read.

The pynvml module can be injected (`Nvml(module=...)`); the tests pass an
object with pynvml's function surface and error codes.

NVML names processes by their pid in the host's pid namespace; the cgroup
lookup (/proc/<pid>/cgroup) is right when agentcgd runs there, as it must to
manage the host's cgroups anyway.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from agentcg.adapters.cgroupfs import pid_cgroup
from agentcg.core.gpu_budget import GpuDevice, GpuProcess, GpuSnapshot

log = logging.getLogger("agentcg.nvml")

# usedGpuMemory when the driver cannot say (pynvml >= 11.5 turns it into None;
# older bindings hand the raw sentinel through)
NVML_VALUE_NOT_AVAILABLE_ULL = (1 << 64) - 1

_HINTS = {   # NVML_ERROR_* code -> what to do about it
    9: "the NVIDIA kernel driver is not loaded",
    12: "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed on this host",
    4: "not allowed to query NVML (run agentcgd as root)",
    18: "the NVML library and the kernel driver versions differ (reboot or reload the driver)",
}


def _nvml_error_text(mod: Any, exc: BaseException) -> str:
    code = getattr(exc, "value", None)
    hint = _HINTS.get(code) if isinstance(exc, getattr(mod, "NVMLError", ())) else None
    text = f"{exc} (NVML error {code})" if code is not None else f"{type(exc).__name__}: {exc}"
    return f"{text}: {hint}" if hint else text


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class Nvml:
    """NVML opened once, read each tick, closed at shutdown."""

    def __init__(self, module: Any = None, *, cgroup_of: Callable[[int], str | None] = pid_cgroup):
        self._mod = module
        self._cgroup_of = cgroup_of
        self._open = False
        self.absent_reason: str | None = None

    def open(self) -> str | None:
        """Load and initialise NVML; -> None, or why the GPUs are absent."""
        if self._open:
            return None
        if self._mod is None:
            try:
                self._mod = importlib.import_module("pynvml")
            except ImportError as e:
                self.absent_reason = f"nvidia-ml-py is not installed (pip install 'agentcg[gpu]'): {e}"
                return self.absent_reason
        try:
            self._mod.nvmlInit()
        except Exception as e:  # noqa: BLE001 - any failure here means "no GPU data", never a crash
            self.absent_reason = f"NVML init failed: {_nvml_error_text(self._mod, e)}"
            log.info("GPU accounting off: %s", self.absent_reason)
            return self.absent_reason
        self._open = True
        self.absent_reason = None
        return None

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._mod.nvmlShutdown()
            except Exception as e:  # noqa: BLE001
                log.warning("nvmlShutdown: %s", _nvml_error_text(self._mod, e))

    def __enter__(self) -> "Nvml":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read(self) -> GpuSnapshot:
        why = self.open()
        if why is not None:
            return GpuSnapshot(absent_reason=why)
        mod = self._mod
        try:
            count = int(mod.nvmlDeviceGetCount())
        except Exception as e:  # noqa: BLE001
            return GpuSnapshot(absent_reason=f"nvmlDeviceGetCount: {_nvml_error_text(mod, e)}")
        if count == 0:
            return GpuSnapshot(absent_reason="NVML sees no GPU devices")
        devices: list[GpuDevice] = []
        procs: list[GpuProcess] = []
        errors: list[str] = []
        for i in range(count):
            try:
                handle = mod.nvmlDeviceGetHandleByIndex(i)
                devices.append(self._device(i, handle))
            except Exception as e:  # noqa: BLE001 - one lost GPU must not hide the others
                errors.append(f"device {i}: {_nvml_error_text(mod, e)}")
                continue
            procs += self._processes(i, handle, errors)
        if not devices:
            return GpuSnapshot(absent_reason="no GPU device could be read: " + "; ".join(errors),
                               errors=tuple(errors))
        return GpuSnapshot(tuple(devices), tuple(procs), None, tuple(errors))

    def _device(self, index: int, handle: Any) -> GpuDevice:
        mod = self._mod
        mem = mod.nvmlDeviceGetMemoryInfo(handle)
        name = uuid = ""
        try:
            name = _text(mod.nvmlDeviceGetName(handle))
            uuid = _text(mod.nvmlDeviceGetUUID(handle))
        except mod.NVMLError:
            pass                      # names are for people; the numbers are what matter
        return GpuDevice(index, int(mem.total), int(mem.used), int(mem.free), name, uuid)

    def _processes(self, index: int, handle: Any, errors: list[str]) -> list[GpuProcess]:
        mod = self._mod
        found: dict[int, tuple[int | None, list[str]]] = {}
        for kind, fn in (("compute", mod.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics", mod.nvmlDeviceGetGraphicsRunningProcesses)):
            try:
                listed = fn(handle)
            except Exception as e:  # noqa: BLE001
                errors.append(f"device {index} {kind} processes: {_nvml_error_text(mod, e)}")
                continue
            for p in listed:
                used = p.usedGpuMemory
                if used is None or used == NVML_VALUE_NOT_AVAILABLE_ULL:
                    used = None
                prev_used, kinds = found.get(p.pid, (None, []))
                # a process with both contexts is listed twice with its one total: take it once
                if prev_used is not None and used is not None:
                    used = max(prev_used, int(used))
                elif used is None:
                    used = prev_used
                found[p.pid] = (None if used is None else int(used), kinds + [kind])
        return [GpuProcess(pid, index, used, "+".join(kinds), self._cgroup_of(pid))
                for pid, (used, kinds) in sorted(found.items())]


def read_gpus(module: Any = None) -> GpuSnapshot:
    """One snapshot, NVML opened and closed around it."""
    with Nvml(module) as nv:
        return nv.read()
