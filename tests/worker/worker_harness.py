"""Shared by the worker API tests: a real tiny engine served in-process.

Not a test module (no test_ prefix); imported by test_openai_*.py and
test_control_engine.py.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from agentcg.worker.async_engine import AsyncEngine
from agentcg.worker.control import ControlServer
from agentcg.worker.engine import Engine, EngineConfig, Request
from agentcg.worker.server import create_app

GPU_BLOCKS = 64
HOST_BLOCKS = 256


def engine_config(**kw) -> EngineConfig:
    base = dict(model="tiny", device="cpu", gpu_blocks=GPU_BLOCKS, host_blocks=HOST_BLOCKS, seed=0)
    base.update(kw)
    return EngineConfig(**base)


def direct_generate(engine: Engine, prompt_ids: list[int], max_tokens: int,
                    session_id: str | None = None) -> tuple[list[int], str]:
    """Greedy generation straight on an Engine: (token ids, finish reason)."""
    rid = f"direct-{time.monotonic_ns()}"
    engine.add_request(Request(request_id=rid, prompt_token_ids=list(prompt_ids), max_tokens=max_tokens,
                               session_id=session_id, temperature=0.0,
                               stop_token_ids=engine.stop_token_ids))
    out: list[int] = []
    while True:
        for ev in engine.step():
            if ev.request_id != rid:
                continue
            if ev.token_id is not None and ev.token_id >= 0:
                out.append(ev.token_id)
            if ev.finished:
                return out, ev.finish_reason
        if not engine.has_work():
            raise AssertionError("engine went idle before the request finished")


def answer_text(engine: Engine, ids: list[int], reason: str) -> str:
    """What the API should answer for these generated ids (the final EOS is not text)."""
    if reason == "stop" and ids and ids[-1] in engine.stop_token_ids:
        ids = ids[:-1]
    return engine.tokenizer.decode(ids)


class Served:
    """A started worker: engine thread, HTTP server on a free loopback port, control socket."""

    def __init__(self, tmp: Path, tokenizer=None, app_kw: dict | None = None, **cfg):
        """tokenizer: replaces the engine's (a test seam); app_kw: more create_app arguments."""
        self.engine = Engine(engine_config(**cfg))
        if tokenizer is not None:
            self.engine.tokenizer = tokenizer
        self.aeng = AsyncEngine(self.engine).start()
        self.socket_path = tmp / "worker.sock"
        self.control = ControlServer(self.aeng, self.socket_path)
        self.app = create_app(self.aeng, control=self.control, **(app_kw or {}))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = self.app.state.model_name

    def stats(self) -> dict:
        return self.aeng.call_sync(self.aeng._stats_on_thread, timeout_s=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.aeng.close()


@contextmanager
def served(tmp: Path, **kw):
    srv = Served(tmp, **kw)
    try:
        yield srv
    finally:
        srv.close()


def wait_for(pred, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


__all__ = ["Served", "served", "direct_generate", "answer_text", "engine_config", "wait_for", "asyncio"]


def prefilled_tokens(stats: dict) -> int:
    """Prompt tokens the engine has computed so far (not counting reused ones)."""
    return stats["prefilled_tokens"]


def gpu_blocks_used(stats: dict) -> int:
    return stats["gpu_blocks_online"] - stats["gpu_blocks_free"]


def gpu_blocks_total(stats: dict) -> int:
    return stats["gpu_blocks_online"]
