"""A stand-in for the pynvml module (nvidia-ml-py) with its function surface,
error class and error codes, for hosts without an NVIDIA GPU.

Names, signatures and codes mirror pynvml 13.x; test_nvml.py checks them
against the installed pynvml. Devices and processes are plain data given to
the constructor; failures are NVML error codes raised where the real library
raises them.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_VALUE_NOT_AVAILABLE_ULL = (1 << 64) - 1   # pynvml's NVML_VALUE_NOT_AVAILABLE_ulonglong.value

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized", NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found", NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """As pynvml.NVMLError: built from a code, which it keeps in `value`."""

    def __new__(cls, value: int):
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


def proc(pid: int, used: int | None) -> SimpleNamespace:
    """One entry of nvmlDeviceGetComputeRunningProcesses (c_nvmlProcessInfo_t's fields)."""
    return SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)


class FakePynvml:
    """devices: list of dicts {name, uuid, total, used, compute: [proc], graphics: [proc],
    lost: bool (the handle fails with GPU_IS_LOST), procs_error: code (process queries fail)}."""

    NVMLError = NVMLError

    def __init__(self, devices: list[dict[str, Any]] | None = None, *, init_error: int | None = None):
        self.devices = devices or []
        self.init_error = init_error
        self.initialised = 0
        self.shutdowns = 0
        for name, value in globals().items():
            if name.startswith("NVML_"):
                setattr(self, name, value)

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _dev(self, handle: Any) -> dict[str, Any]:
        self._check()
        return self.devices[handle.index]

    def nvmlInit(self):
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self._check()
        self.initialised -= 1
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check()
        if not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if self.devices[index].get("lost"):
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle):
        return self._dev(handle).get("name", "NVIDIA Fake")

    def nvmlDeviceGetUUID(self, handle):
        return self._dev(handle).get("uuid", f"GPU-fake-{handle.index}")

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        d = self._dev(handle)
        return SimpleNamespace(total=d["total"], used=d["used"], free=d["total"] - d["used"])

    def _procs(self, handle, key):
        d = self._dev(handle)
        if d.get("procs_error") is not None:
            raise NVMLError(d["procs_error"])
        return list(d.get(key, []))

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self._procs(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self._procs(handle, "graphics")
