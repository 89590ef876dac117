"""agentcg-worker as a user starts it: --help, and a real start on CPU with the tiny model."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

WORKER = Path(sys.executable).with_name("agentcg-worker")


def worker_cmd() -> list[str]:
    if WORKER.exists():
        return [str(WORKER)]
    return [sys.executable, "-m", "agentcg.worker.main"]


def test_help_explains_the_options():
    r = subprocess.run(worker_cmd() + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("--model", "--device", "--host", "--port", "--control-socket", "--gpu-blocks",
                 "--host-blocks", "X-Agentcg-Session", "/v1/chat/completions", "suspend"):
        assert word in r.stdout, word


def test_bad_option_is_a_clear_error():
    r = subprocess.run(worker_cmd() + ["--gpu-blocks", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--gpu-blocks" in r.stderr and "at least 1" in r.stderr


def test_start_serve_and_stop_by_pid(tmp_path):
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen(worker_cmd() + ["--model", "tiny", "--device", "cpu", "--port", "0",
                                            "--control-socket", str(sock), "--gpu-blocks", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = None
        deadline = time.monotonic() + 90
        while ready is None and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if r:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("agentcg-worker ready: "):
                    ready = line
            elif proc.poll() is not None:
                break
        assert ready, f"no ready line; rc={proc.poll()} stderr={proc.stderr.read() if proc.poll() is not None else ''}"
        url = ready.split()[2]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert f"pid={proc.pid}" in ready and f"control={sock}" in ready
        with urllib.request.urlopen(url + "/models", timeout=30) as resp:
            models = json.load(resp)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert sock.exists()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            pytest.fail("agentcg-worker did not stop on SIGTERM")
    err = proc.stderr.read()
    assert rc == 0, err
    assert "loading model tiny" in err, err
    assert not sock.exists(), "the control socket is removed on exit"
