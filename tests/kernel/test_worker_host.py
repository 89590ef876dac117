"""agentcgd with a real agentcg-worker child (tiny model, CPU) on this host's
cgroup2 tree: the worker in <root>/worker, a session's KV cache swapped out
during its tool call and back before its next turn (answer unchanged), and a
worker killed with SIGKILL started again while tool calls go on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest

from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2
from daemon_proc import Agentcgd, poll
from agentcg.worker.control import WorkerControl

pytest.importorskip("torch")
pytestmark = pytest.mark.kernel

PROMPT = [{"role": "user", "content": "word " * 60}]   # about 21 blocks of 16 tokens


def wait_for(fn, what: str, timeout_s: float = 60.0):
    value = poll(fn, timeout_s, interval_s=0.05)
    if not value:
        pytest.fail(f"timed out waiting for {what}")
    return value


def worker_status(client) -> dict:
    return client.status()["hooks"]["worker"]


def chat(url: str, messages: list[dict], session: dict | None) -> str:
    body = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", **(session or {})})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["message"]["content"]


@pytest.fixture
def daemon(request):
    root, runtime = daemon_dirs(request, require_cgroup2())
    sock = runtime / "worker.sock"
    cfg = runtime / "agentcg.toml"
    cfg.write_text(f"""
[worker]
enabled = true
model = "tiny"
device = "cpu"
port = 0
gpu_blocks = 32
host_blocks = 64
control_socket = "{sock}"
restart_backoff_s = 0.2
memory_max = "4G"

[gpu]
sample_interval_ms = 200
kv_pressure_free_fraction = 0.5
""")
    d = Agentcgd(root, runtime, extra_args=["--config", str(cfg)]).start()
    d.worker_socket = str(sock)
    yield d
    d.stop(signal.SIGTERM)           # the daemon stops its worker
    worker_cg = root / "worker"
    if worker_cg.exists():
        if (worker_cg / "cgroup.procs").read_text().split():
            (worker_cg / "cgroup.kill").write_text("1")
            wait_for(lambda: not (worker_cg / "cgroup.procs").read_text().split(), "the worker to exit", 10)
        worker_cg.rmdir()
    remove_daemon_tree(root)
    shutil.rmtree(runtime, ignore_errors=True)


def test_worker_child_kv_swapped_during_a_call_and_restarted_after_a_crash(daemon, tmp_path):
    from agentcg.client import Client
    c = Client(daemon.socket)
    st = wait_for(lambda: (w := worker_status(c))["state"] == "up" and w, "the worker to answer ping")
    assert st["mode"] == "child" and st["restarts"] == 0 and st["url"].startswith("http://127.0.0.1:")
    # it runs in a cgroup of its own, from its first instruction
    procs = (daemon.root / "worker" / "cgroup.procs").read_text().split()
    assert str(st["pid"]) in procs
    gpu = c.status()["hooks"]["gpu"]
    assert gpu["nvml"] == "absent" and gpu["absent_reason"]    # no GPU here: said, not fatal
    wc = WorkerControl(daemon.worker_socket, timeout_s=10)

    with c.session("agent1") as s:
        headers = s.llm_headers()
        assert headers == {"X-Agentcg-Session": "agent1"}
        first = chat(st["url"], PROMPT, headers)
        assert wc.stats()["sessions"]["agent1"]["where"] == "gpu"
        turn2 = PROMPT + [{"role": "assistant", "content": first}, {"role": "user", "content": "more"}]

        flag = tmp_path / "done"
        call = s.tool_call("wait", intent="duration=60s").popen(
            ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done"])
        moved = wait_for(lambda: (t := wc.stats()["sessions"]["agent1"])["where"] == "host" and t,
                         "the session's KV cache to move to the host pool")
        assert moved["blocks_gpu"] == 0 and moved["blocks_host"] > 0
        # while it is out: the same next turn with no session, computed in full
        reference = chat(st["url"], turn2, None)
        flag.touch()
        r = call.wait()
        assert r.exit_status == 0 and r.stats["extra"]["kv_placement"] == "swap"
        assert "gpu_memory_peak_bytes" in r.stats["extra"]
        # the daemon's resume brings it back before the agent's next turn
        back = wait_for(lambda: (t := wc.stats()["sessions"]["agent1"])["where"] == "gpu" and t,
                        "the session's KV cache to come back to the device")
        assert back["blocks_host"] == 0 and back["blocks_gpu"] == moved["blocks_host"]
        assert chat(st["url"], turn2, headers) == reference

        # session show: its GPU memory (absent here) and its share of the worker's (sampled)
        shown = wait_for(lambda: (g := c.show("agent1")["gpu"])["worker_kv_where"] == "gpu" and g,
                         "the next sample of the worker")
        assert shown["worker_kv_device_bytes"] > 0 and shown["memory_bytes"] is None
        kv = [e for e in c.events() if e["type"] == "gpu.kv" and e.get("session") == "agent1"]
        assert [(e["op"], e["mode"]) for e in kv] == [("suspend", "swap"), ("resume", "swap")]
        assert kv[0]["old"] == "gpu" and kv[0]["new"] == "host" and "swap to host" in kv[0]["reason"]
        assert kv[0]["expected_from"] == "intent"

        # kill -9 the worker: tool calls go on meanwhile, and it comes back
        old_pid = st["pid"]
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: worker_status(c)["state"] != "up", "the daemon to notice the crash", 10)
        r = s.run(["true"])
        assert r.exit_status == 0
        st2 = wait_for(lambda: (w := worker_status(c))["state"] == "up" and w, "the worker to be restarted")
        assert st2["restarts"] == 1 and st2["pid"] != old_pid
        assert "SIGKILL" in (st2["last_error"] or "")
        assert s.run(["true"]).exit_status == 0
    events = [e["type"] for e in c.events() if e["type"].startswith("worker.")]
    assert events == ["worker.start", "worker.up", "worker.exit", "worker.start", "worker.up"]
