"""The daemon's GPU coordination (daemon/gpu.py, daemon/kv.py) with NVML
through the pynvml stand-in at the adapter boundary and the worker's real
ControlServer over a pool that frees and takes device memory as NVML sees it."""
from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

import pytest

from fake_pynvml import NVML_ERROR_LIBRARY_NOT_FOUND, FakePynvml, proc
from agentcg.adapters.cgroupfs import CgroupFs
from agentcg.adapters.executor import Executor
from agentcg.adapters.nvml import Nvml
from agentcg.core.config import ConfigError, parse_config
from agentcg.core.intents import Intent
from agentcg.core.model import Limits
from agentcg.daemon.gpu import GpuCoordinator
from agentcg.daemon.kv import KvPlacer
from agentcg.daemon.state import CallRecord, SessionRecord
from agentcg.daemon.worker_host import WorkerHost, backoff_s
from agentcg.worker.control import ControlServer

G = 1 << 30
MiB = 1 << 20


class Pool:
    """The AsyncEngine surface ControlServer calls: a device KV pool in 1G
    chunks whose shrink and grow change the device's used memory in NVML."""

    def __init__(self, device: dict, chunks: int = 8):
        self.device, self.total, self.online = device, chunks, chunks
        self.where = {"s1": "gpu"}
        self.free_blocks = 4000
        self.calls: list[tuple] = []

    async def stats(self):
        sess = {"s1": {"tokens": 4000, "keep": False, "where": self.where["s1"],
                       "blocks_gpu": 256 if self.where["s1"] == "gpu" else 0,
                       "blocks_host": 256 if self.where["s1"] == "host" else 0}}
        return {"device": "cuda:0", "block_bytes": MiB, "chunk_bytes": G, "chunks_online": self.online,
                "gpu_pool_bytes": self.online * G, "gpu_blocks_online": self.online * 1024,
                "gpu_blocks_free": self.free_blocks, "host_blocks_free": 4096, "sessions": sess, "requests": {},
                "cost_model": {"d2h_gbps": 10.0, "h2d_gbps": 10.0, "prefill_tokens_per_s": 1000.0}}

    async def suspend(self, session_id, mode, ttl_s):
        self.calls.append(("suspend", session_id, mode))
        self.where[session_id] = "host" if mode == "swap" else "gpu"
        return {"session": session_id, "where": self.where[session_id]}

    async def resume(self, session_id):
        self.calls.append(("resume", session_id))
        self.where[session_id] = "gpu"
        return {"session": session_id, "where": "gpu"}

    async def shrink(self, nbytes):
        n = min(self.online - 1, math.ceil(nbytes / G))
        self.online -= n
        self.device["used"] -= n * G
        return {"freed_bytes": n * G}

    async def grow(self, nbytes):
        n = min(self.total - self.online, math.ceil(nbytes / G))
        self.online += n
        self.device["used"] += n * G
        return {"grown_bytes": n * G}


class Owner:
    """What the coordinator reads of the daemon: its sessions, its cgroup tree,
    its one writer, its events."""

    def __init__(self, root: Path):
        self.cgfs = CgroupFs(root)
        self.executor = Executor(self.cgfs)
        self.mount = str(root.parent)
        self.sessions: dict[str, SessionRecord] = {}
        self.events: list[dict] = []

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def session(self, name: str) -> SessionRecord:
        s = SessionRecord(name=name, uid=0, intent=Intent(), limits=Limits(), created_time=time.time())
        self.sessions[name] = s
        return s

    def call(self, s: SessionRecord, n: int, intent: str = "", argv=("pytest",)) -> CallRecord:
        c = CallRecord(session=s.name, n=n, name="t", uid=0, pid=1, intent=Intent.parse(intent or None),
                       limits=Limits(), start_ns=time.monotonic_ns(), start_time=time.time(), argv=list(argv))
        s.calls[n] = c
        path = self.cgfs.path(c.rel)
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.kill").write_text("0")
        (path / "cgroup.procs").write_text("")
        return c


async def settle(kv: KvPlacer) -> None:
    """Until the session's worker ops are done."""
    await asyncio.sleep(0)
    while kv.tasks.get("s1") is not None:
        await kv.tasks["s1"]


def settings(text: str = ""):
    return parse_config(f"[gpu]\nsample_interval_ms = 50\nadmit_timeout_s = 2\n{text}").gpu


@pytest.fixture
def world(tmp_path):
    with tempfile.TemporaryDirectory(dir="/tmp") as d:          # AF_UNIX paths are short
        yield tmp_path, Path(d) / "w.sock"


async def serving(pool: Pool, sock: Path, tmp_path: Path, owner: Owner):
    server = ControlServer(pool, str(sock))
    await server.start()
    cfg = parse_config(f'[worker]\nenabled = true\ncontrol_socket = "{sock}"\n').worker
    worker = WorkerHost(cfg, None, str(tmp_path))
    worker.state, worker.pid = "attached", 4242
    worker.emit = owner.emit
    return server, worker


def test_gpu_memory_call_waits_for_a_shrink_then_starts_and_the_pool_grows_back(world):
    tmp_path, sock = world
    dev = {"total": 16 * G, "used": 14 * G, "compute": [proc(4242, 12 * G)]}
    nv = FakePynvml([dev])
    owner = Owner(tmp_path / "agentcg")

    async def main():
        pool = Pool(dev)
        server, worker = await serving(pool, sock, tmp_path, owner)
        gpu = GpuCoordinator(settings(), Nvml(nv, cgroup_of=lambda pid: None), worker=worker,
                             state_path=str(tmp_path / "gpu.json"), emit=owner.emit)
        gpu.bind(owner)
        s = owner.session("s1")
        intent = Intent.parse("gpu_memory=4G")
        await gpu.admit_call(s, intent, {})
        # 2G free less 256M headroom: 2.25G missing -> 3 whole chunks
        assert pool.online == 5 and dev["used"] == 11 * G
        assert [e["bytes"] for e in owner.events if e["type"] == "gpu.shrink"] == [3 * G]
        assert json.loads((tmp_path / "gpu.json").read_text())["loans"] == {"s1/pending-1": 3 * G}
        c = owner.call(s, 1, "gpu_memory=4G")
        gpu.on_call_start(s, c, owner.cgfs.path(c.rel))
        assert gpu.loans == {"s1/1": 3 * G}
        del s.calls[1]
        extra = gpu.on_call_end(s, c, owner.cgfs.path(c.rel))
        assert extra["gpu_memory_peak_bytes"] is None or extra["gpu_memory_peak_bytes"] == 0
        await gpu._give_back()
        assert pool.online == 8 and gpu.loans == {}
        assert [e["bytes"] for e in owner.events if e["type"] == "gpu.grow"] == [3 * G]
        await server.close()
        worker.close()

    asyncio.run(main())


def test_a_call_that_can_never_fit_is_refused_with_the_reason(world):
    tmp_path, sock = world
    nv = FakePynvml([{"total": 8 * G, "used": 1 * G}])
    owner = Owner(tmp_path / "agentcg")
    gpu = GpuCoordinator(settings(), Nvml(nv, cgroup_of=lambda pid: None))
    gpu.bind(owner)
    from agentcg.protocol import ProtocolError
    with pytest.raises(ProtocolError, match="gpu_memory: .*can never fit"):
        asyncio.run(gpu.admit_call(owner.session("s1"), Intent.parse("gpu_memory=12G"), {}))


def test_sampling_attributes_memory_peaks_overuse_and_kill(world):
    tmp_path, sock = world
    owner = Owner(tmp_path / "agentcg")
    s = owner.session("s1")
    c = owner.call(s, 1, "gpu_memory=1G")
    cg = {101: "/agentcg/s-s1/c-1", 102: "/agentcg/s-s1/agent", 103: "/elsewhere"}
    dev = {"total": 16 * G, "used": 6 * G,
           "compute": [proc(101, 2 * G), proc(102, 512 * MiB), proc(103, G), proc(4242, 2 * G)]}
    nv = FakePynvml([dev])

    async def main():
        pool = Pool(dev)
        server, worker = await serving(pool, sock, tmp_path, owner)
        gpu = GpuCoordinator(settings('enforce = "kill"'), Nvml(nv, cgroup_of=cg.get), worker=worker,
                             emit=owner.emit)
        gpu.bind(owner)
        await gpu.sample()
        st = gpu.status()
        assert st["nvml"] == "present" and st["by_session_bytes"] == {"s1": 2 * G + 512 * MiB}
        assert st["worker_bytes"] == 2 * G and st["other_bytes"] == G
        view = gpu.session_view(s)["gpu"]
        assert view["memory_bytes"] == 2 * G + 512 * MiB and view["worker_kv_device_bytes"] == 256 * MiB
        kinds = [e["type"] for e in owner.events]
        assert "gpu.overuse" in kinds and "gpu.kill" in kinds
        assert (owner.cgfs.path(c.rel) / "cgroup.kill").read_text() == "1"
        dev["compute"][0] = proc(101, G)      # lower now: the peak stays
        await gpu.sample()
        del s.calls[1]
        extra = gpu.on_call_end(s, c, owner.cgfs.path(c.rel))
        assert extra["gpu_memory_peak_bytes"] == 2 * G
        assert [f["kind"] for f in extra["gpu_feedback"]] == ["gpu_overuse", "gpu_kill"]
        await server.close()
        worker.close()

    asyncio.run(main())


def test_no_nvml_is_reported_absent_and_calls_are_admitted(tmp_path):
    owner = Owner(tmp_path / "agentcg")
    gpu = GpuCoordinator(settings(), Nvml(FakePynvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)))
    gpu.bind(owner)
    s = owner.session("s1")
    asyncio.run(gpu.sample())
    asyncio.run(gpu.admit_call(s, Intent.parse("gpu_memory=4G"), {}))    # admitted, budget not checked
    st = gpu.status()
    assert st["nvml"] == "absent" and "NVML Shared Library Not Found" in st["absent_reason"]
    c = owner.call(s, 1, "gpu_memory=4G")
    gpu.on_call_start(s, c, owner.cgfs.path(c.rel))
    extra = gpu.on_call_end(s, c, owner.cgfs.path(c.rel))
    assert extra["gpu_memory_peak_bytes"] is None and "NVML" in extra["gpu_absent_reason"]
    assert gpu.session_view(s)["gpu"]["memory_bytes"] is None


def test_kv_swapped_for_a_long_call_resumed_at_its_end_and_durations_kept(world):
    tmp_path, sock = world
    owner = Owner(tmp_path / "agentcg")
    s = owner.session("s1")
    dev = {"total": 16 * G, "used": 8 * G}

    async def main():
        pool = Pool(dev)
        pool.free_blocks = 100          # 1% of the KV pool free: under pressure
        server, worker = await serving(pool, sock, tmp_path, owner)
        kv = KvPlacer(worker, settings().placement(), str(tmp_path / "durations.json"), emit=owner.emit)
        c = owner.call(s, 1, "duration=120s")
        kv.on_call_start(s, c, Path("/x"))
        await asyncio.sleep(0)
        await kv.tasks["s1"]
        assert pool.where["s1"] == "host"
        extra = kv.on_call_end(s, c, Path("/x"))
        await kv.tasks["s1"]
        assert extra == {"kv_placement": "swap"} and pool.where["s1"] == "gpu"
        ev = [e for e in owner.events if e["type"] == "gpu.kv"]
        assert [(e["op"], e.get("old"), e["new"]) for e in ev] == [("suspend", "gpu", "host"), ("resume", None, "gpu")]
        assert "swap to host" in ev[0]["reason"] and ev[0]["expected_from"] == "intent"
        # a short command by its history: too short to move, kept
        for n in (2, 3):
            c = owner.call(s, n, "", argv=["ls"])
            kv.on_call_start(s, c, Path("/x"))
            await asyncio.sleep(0)
            await settle(kv)
            c.start_ns = time.monotonic_ns() - 10 ** 8
            kv.on_call_end(s, c, Path("/x"))
            await settle(kv)
        last = [e for e in owner.events if e["type"] == "gpu.kv" and e["op"] == "suspend"][-1]
        assert last["mode"] == "keep" and last["expected_from"] == "session" and "too short" in last["reason"]
        kv.close()
        kv.save()
        again = KvPlacer(worker, settings().placement(), str(tmp_path / "durations.json"))
        assert again.durations.estimate("other", ["ls"]).source == "host"
        await server.close()
        worker.close()

    asyncio.run(main())


def test_worker_and_gpu_tables_name_the_bad_field():
    for text, field in [('[worker]\ndevice = "tpu"', "worker.device"), ("[worker]\nport = -1", "worker.port"),
                        ('[worker]\ncontrol_socket = "rel.sock"', "worker.control_socket"),
                        ('[worker]\nmemory_max = "lots"', "worker.memory_max"),
                        ("[worker]\nrestart_backoff_s = -1", "worker.restart_backoff_s"),
                        ('[gpu]\non_no_room = "wait"', "gpu.on_no_room"),
                        ("[gpu]\nkv_payback_ratio = 0.5", "gpu.kv_payback_ratio"), ("[gpu]\nfoo = 1", "gpu.foo")]:
        with pytest.raises(ConfigError) as e:
            parse_config(text)
        assert e.value.key == field
    cfg = parse_config("")
    assert not cfg.worker.enabled and cfg.gpu.enabled and cfg.gpu.budget().enforce == "report"
    attach = parse_config('[worker]\nenabled = true\ncontrol_socket = "/run/w.sock"').worker
    assert attach.attach and attach.socket_in("/run/agentcg") == "/run/w.sock"


def test_restart_backoff_doubles_up_to_its_cap():
    cfg = parse_config("[worker]\nrestart_backoff_s = 0.5\nrestart_backoff_max_s = 3").worker
    assert [backoff_s(cfg, n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
