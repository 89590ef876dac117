"""NVML adapter against a pynvml stand-in, and against the real pynvml with no driver."""
from __future__ import annotations

import ctypes.util
import inspect
import os
import sys

import pytest

from agentcg.adapters import cgroupfs
from agentcg.adapters.nvml import Nvml, read_gpus
from fake_pynvml import (
    NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_NOT_SUPPORTED, NVML_VALUE_NOT_AVAILABLE_ULL, FakePynvml, proc,
)

GiB = 1 << 30
CGROUPS = {100: "/agentcg/s1/c-1", 101: "/agentcg/s1/agent", 102: "/system.slice/worker.service"}


def two_gpus(**dev1: object) -> FakePynvml:
    return FakePynvml([
        {"name": "NVIDIA H100", "uuid": "GPU-a", "total": 80 * GiB, "used": 30 * GiB,
         "compute": [proc(100, 4 * GiB), proc(102, 20 * GiB)], "graphics": [proc(101, GiB)]},
        {"total": 80 * GiB, "used": GiB, "compute": [proc(103, None), proc(104, NVML_VALUE_NOT_AVAILABLE_ULL)],
         **dev1},
    ])


def test_devices_and_compute_and_graphics_processes_with_cgroups():
    fake = two_gpus()
    nv = Nvml(fake, cgroup_of=CGROUPS.get)
    snap = nv.read()
    assert snap.present and snap.errors == ()
    d0, d1 = snap.devices
    assert (d0.index, d0.name, d0.uuid, d0.total_bytes, d0.used_bytes, d0.free_bytes) == \
        (0, "NVIDIA H100", "GPU-a", 80 * GiB, 30 * GiB, 50 * GiB)
    by_pid = {p.pid: p for p in snap.processes}
    assert (by_pid[100].used_bytes, by_pid[100].kind, by_pid[100].cgroup) == (4 * GiB, "compute", "/agentcg/s1/c-1")
    assert (by_pid[101].kind, by_pid[101].cgroup) == ("graphics", "/agentcg/s1/agent")
    # NVML_VALUE_NOT_AVAILABLE (None from pynvml, or the raw sentinel): listed, not counted
    assert by_pid[103].used_bytes is None and by_pid[104].used_bytes is None
    assert by_pid[103].device_index == 1
    nv.close()
    assert fake.shutdowns == 1 and fake.initialised == 0


def test_a_process_with_both_contexts_is_counted_once():
    fake = FakePynvml([{"total": 8 * GiB, "used": 3 * GiB, "compute": [proc(7, 3 * GiB)],
                        "graphics": [proc(7, 3 * GiB)]}])
    (p,) = read_gpus(fake).processes
    assert (p.pid, p.used_bytes, p.kind) == (7, 3 * GiB, "compute+graphics")


def test_init_error_is_absent_with_the_reason_and_a_hint():
    snap = Nvml(FakePynvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED)).read()
    assert not snap.present
    assert "Driver Not Loaded" in snap.absent_reason and "kernel driver is not loaded" in snap.absent_reason


def test_lost_device_and_unsupported_process_list_are_errors_not_failures():
    snap = Nvml(two_gpus(lost=True), cgroup_of=CGROUPS.get).read()
    assert [d.index for d in snap.devices] == [0]
    assert snap.errors == ("device 1: GPU is lost (NVML error 15)",)
    snap = Nvml(two_gpus(procs_error=NVML_ERROR_NOT_SUPPORTED), cgroup_of=CGROUPS.get).read()
    assert len(snap.devices) == 2 and {p.device_index for p in snap.processes} == {0}
    assert any("device 1 compute processes: Not Supported" in e for e in snap.errors)


def test_no_devices_is_absent():
    assert Nvml(FakePynvml([])).read().absent_reason == "NVML sees no GPU devices"


def test_default_cgroup_lookup_reads_proc():
    fake = FakePynvml([{"total": GiB, "used": 0, "compute": [proc(os.getpid(), 1)]}])
    (p,) = read_gpus(fake).processes
    assert p.cgroup == cgroupfs.pid_cgroup(os.getpid())


def test_missing_pynvml_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    snap = Nvml().read()
    assert not snap.present and "nvidia-ml-py is not installed" in snap.absent_reason


def test_real_pynvml_without_a_driver_is_absent_with_the_reason():
    pynvml = pytest.importorskip("pynvml")
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("an NVIDIA driver is installed here")
    snap = Nvml().read()
    assert not snap.present
    assert "NVML Shared Library Not Found" in snap.absent_reason and "no NVIDIA driver" in snap.absent_reason
    assert Nvml(pynvml).read().absent_reason == snap.absent_reason


def test_the_stand_in_mirrors_the_real_pynvml_surface():
    pynvml = pytest.importorskip("pynvml")
    fake = FakePynvml()
    used = [n for n in dir(FakePynvml) if n.startswith("nvml")]
    assert len(used) == 9
    for name in used:
        real = inspect.signature(getattr(pynvml, name))
        assert list(inspect.signature(getattr(fake, name)).parameters) == list(real.parameters), name
    for name in dir(fake):
        if name.startswith("NVML_ERROR_") or name == "NVML_SUCCESS":
            assert getattr(pynvml, name) == getattr(fake, name), name
    assert pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value == NVML_VALUE_NOT_AVAILABLE_ULL
    real_err = pynvml.NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    assert str(real_err) == str(fake.NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)) and real_err.value == 9
    # the adapter only reads these fields of a process entry
    assert {"pid", "usedGpuMemory"} <= {f[0] for f in pynvml.c_nvmlProcessInfo_t._fields_}
    assert {"total", "free", "used"} <= {f[0] for f in pynvml.c_nvmlMemory_t._fields_}
