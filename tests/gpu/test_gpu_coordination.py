"""GPU coordination on a real GPU: NVML attributes a tool call's CUDA memory
to that call, and a call whose `gpu_memory` does not fit makes the worker's KV
pool shrink, runs, and the pool grows back when it ends. Needs a CUDA GPU,
NVML, root and a cgroup2 mount; skips without them."""
from __future__ import annotations

import shutil
import signal
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pynvml")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU available", allow_module_level=True)

from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2  # noqa: E402
from daemon_proc import Agentcgd, poll  # noqa: E402

from agentcg.worker.control import WorkerControl  # noqa: E402

GiB = 1 << 30


def wait_for(fn, what: str, timeout_s: float = 120.0):
    value = poll(fn, timeout_s, interval_s=0.1)
    if not value:
        pytest.fail(f"timed out waiting for {what}")
    return value


def hold_gpu(nbytes: int, seconds: float) -> list[str]:
    """A tool call that allocates nbytes on the GPU and holds them."""
    code = ("import time, torch; x = torch.empty(%d, dtype=torch.uint8, device='cuda'); "
            "torch.cuda.synchronize(); time.sleep(%f)" % (nbytes, seconds))
    return [sys.executable, "-c", code]


def start(request, config: str):
    root, runtime = daemon_dirs(request, require_cgroup2())
    cfg = runtime / "agentcg.toml"
    cfg.write_text(config.replace("@RUNTIME@", str(runtime)))
    d = Agentcgd(root, runtime, extra_args=["--config", str(cfg)]).start()

    def stop():
        d.stop(signal.SIGTERM)
        remove_daemon_tree(root)
        shutil.rmtree(runtime, ignore_errors=True)
    request.addfinalizer(stop)
    return d


def test_nvml_attributes_a_calls_cuda_memory_to_that_call(request):
    from agentcg.client import Client
    d = start(request, "[gpu]\nsample_interval_ms = 100\n")
    c = Client(d.socket)
    if c.status()["hooks"]["gpu"]["nvml"] != "present":
        pytest.skip(f"NVML absent: {c.status()['hooks']['gpu'].get('absent_reason')}")
    with c.session("g1") as s:
        call = s.tool_call("alloc").popen(hold_gpu(2 * GiB, 4.0))
        seen = poll(lambda: c.status()["hooks"]["gpu"].get("by_session_bytes", {}).get("g1", 0) >= 2 * GiB,
                    60, interval_s=0.1)
        r = call.wait()
    assert r.exit_status == 0
    if not seen:
        pytest.skip("NVML lists no per-process memory here (another pid namespace, or the driver hides it)")
    assert r.stats["extra"]["gpu_memory_peak_bytes"] >= 2 * GiB


def test_a_gpu_memory_call_that_does_not_fit_shrinks_the_pool_and_it_grows_back(request):
    from agentcg.client import Client
    free_b, total_b = torch.cuda.mem_get_info(0)
    d = start(request, f"""
[worker]
enabled = true
model = "tiny"
device = "cuda"
port = 0
gpu_memory_fraction = 0.9
control_socket = "@RUNTIME@/worker.sock"

[gpu]
sample_interval_ms = 100
admit_timeout_s = 60
""")
    c = Client(d.socket)
    wait_for(lambda: c.status()["hooks"]["worker"]["state"] == "up", "the worker")
    if c.status()["hooks"]["gpu"]["nvml"] != "present":
        pytest.skip(f"NVML absent: {c.status()['hooks']['gpu'].get('absent_reason')}")
    wc = WorkerControl(str(d.runtime / "worker.sock"), timeout_s=30)
    pool_before = wc.stats()["gpu_pool_bytes"]
    free_now = torch.cuda.mem_get_info(0)[0]
    want = free_now + 4 * GiB                  # more than is free: the pool must give up the rest
    assert want < pool_before, "the pool is too small for this test on this device"
    with c.session("g2") as s:
        r = s.tool_call("big", intent={"gpu_memory": str(want)}).run(hold_gpu(want - GiB // 2, 2.0))
        assert r.exit_status == 0
        shrinks = [e for e in c.events() if e["type"] == "gpu.shrink" and e.get("session") == "g2"]
        assert shrinks, "the call was admitted without the pool shrinking"
    assert wait_for(lambda: wc.stats()["gpu_pool_bytes"] >= pool_before, "the pool to grow back")
    assert any(e["type"] == "gpu.grow" for e in c.events())
