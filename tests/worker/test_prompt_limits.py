"""Prompt size limit and tokenisation off the event loop.

A prompt over --max-prompt-bytes is refused (413, OpenAI error body naming the
limit) before anything tokenises it; while a prompt is being tokenised the
server still answers other requests (/health). The tokenizer below is the
worker's byte tokenizer with a gate in encode(), a seam to hold a
tokenisation in progress.
"""
from __future__ import annotations

import threading

import pytest
from worker_harness import served

from agentcg.worker.tokenizer import ByteTokenizer

httpx = pytest.importorskip("httpx")

LIMIT_BYTES = 1000
HOLD_S = 30.0           # the longest the gate holds if the test goes wrong


class GatedTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gated = False

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        self.calls += 1
        if self.gated:
            self.entered.set()
            self.release.wait(HOLD_S)
        return super().encode(text, add_bos)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    tok = GatedTokenizer()
    with served(tmp_path_factory.mktemp("limits"), tokenizer=tok, app_kw={"max_prompt_bytes": LIMIT_BYTES},
                measure=False) as srv:
        yield srv, tok


def _url(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.port}{path}"


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "é" * (LIMIT_BYTES // 2 + 1), "max_tokens": 1}),   # 1002 bytes, 501 chars
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x" * 600},
                                           {"role": "user", "content": "y" * 401}], "max_tokens": 1}),
])
def test_oversized_prompt_is_refused_without_tokenising(gated, route, body):
    srv, tok = gated
    before = tok.calls
    r = httpx.post(_url(srv, route), json=body, timeout=30)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "prompt_too_large"
    assert err["type"] == "invalid_request_error"
    assert err["param"] == ("prompt" if "prompt" in body else "messages")
    assert f"the limit is {LIMIT_BYTES} bytes" in err["message"]
    assert tok.calls == before


def test_prompt_at_the_limit_is_served(gated):
    srv, _tok = gated
    r = httpx.post(_url(srv, "/v1/completions"), json={"prompt": "a" * LIMIT_BYTES, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200, r.text


def test_oversized_body_is_refused_by_its_declared_length(gated):
    import json
    import socket

    from agentcg.worker.server import MAX_BODY_BYTES

    srv, tok = gated
    before = tok.calls
    # only the head and a few body bytes are sent: the declared length alone decides
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n{{\"prompt\": \"")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head.encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line
    err = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_too_large"
    assert f"the limit is {MAX_BODY_BYTES} bytes" in err["message"]
    assert tok.calls == before


def test_health_answers_while_a_prompt_is_tokenised(gated):
    srv, tok = gated
    result: dict = {}

    def send() -> None:
        r = httpx.post(_url(srv, "/v1/completions"), json={"prompt": "hello", "max_tokens": 2}, timeout=60)
        result["status"] = r.status_code

    tok.gated = True
    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert tok.entered.wait(HOLD_S), "the request never reached the tokenizer"
        health = httpx.get(_url(srv, "/health"), timeout=HOLD_S / 2)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        assert not tok.release.is_set() and sender.is_alive()      # the tokenisation is still held
    finally:
        tok.gated = False
        tok.release.set()
        sender.join(60)
    assert result.get("status") == 200
