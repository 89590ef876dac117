"""The NVML adapter on a real NVIDIA driver: the device's memory matches
CUDA's view, and this process's allocation shows under its own pid and
cgroup."""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pynvml")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU available", allow_module_level=True)

from agentcg.adapters.cgroupfs import pid_cgroup  # noqa: E402
from agentcg.adapters.nvml import Nvml  # noqa: E402

GiB = 1 << 30


def test_snapshot_sees_the_device_and_this_process_allocation():
    x = torch.empty(GiB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    with Nvml() as nv:
        snap = nv.read()
    assert snap.present, snap.absent_reason
    free_b, total_b = torch.cuda.mem_get_info(0)
    # CUDA device 0 is NVML's device 0 unless CUDA_VISIBLE_DEVICES renumbers them
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        d0 = snap.device(0)
        assert d0.total_bytes == total_b
        assert d0.used_bytes + d0.free_bytes <= d0.total_bytes
    mine = [p for p in snap.processes if p.pid == os.getpid()]
    if not mine:
        pytest.skip("NVML lists no processes here (another pid namespace, or the driver hides them)")
    (p,) = mine
    assert "compute" in p.kind
    if p.used_bytes is not None:
        assert p.used_bytes >= GiB
    assert p.cgroup == pid_cgroup(os.getpid())
    del x
