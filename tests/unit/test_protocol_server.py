"""The socket server's error path, on a real Unix socket: the daemon's own
Server and Daemon over a cgroup tree of plain directories (no kernel needed).
Malformed requests get documented codes and never an exception's text; what
any client can provoke reaches the log as a trickle (counted in records)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from agentcg import protocol as p
from agentcg.adapters.cgroupfs import CgroupFs
from agentcg.core.config import Config
from agentcg.daemon.app import INTERNAL_MESSAGE, Server
from agentcg.daemon.hooks import Hooks
from agentcg.daemon.service import Daemon


class Served:
    """A Server on its own event loop in a thread, listening on `path`."""

    def __init__(self, daemon: Daemon, path: Path):
        self.daemon, self.path = daemon, str(path)
        self.loop = asyncio.new_event_loop()
        self.server = Server(daemon)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            srv = self.loop.run_until_complete(
                asyncio.start_unix_server(self.server.client, path=self.path, limit=daemon.cfg.max_message_bytes))
            self._srv = srv
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._srv.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def exchange(self, data: bytes, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Send data, half-close, read every reply until the daemon closes."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout_s)
            s.connect(self.path)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return [json.loads(line) for line in out.splitlines()]

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.exchange(p.encode(p.request(1, op, **fields)))[0]


def make_daemon(tmp_path: Path, cls: type[Daemon] = Daemon) -> Daemon:
    cfg = Config()
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, runtime_dir=str(tmp_path)))
    (tmp_path / "cg").mkdir()
    return cls(cfg, CgroupFs(tmp_path / "cg"), Hooks())


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    srv = Served(make_daemon(tmp_path), tmp_path / "agentcg.sock")
    yield srv
    srv.close()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record the daemon's loggers write, DEBUG included."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("agentcg")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old)


def _error(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is False, reply
    return reply["error"]


def test_deeply_nested_json_is_a_bad_request_naming_the_limit(served):
    for deep in (b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 5000 + b"1" + b"}" * 5000):
        line = b'{"v":1,"id":4,"op":"status","x":' + deep + b"}\n"
        err = _error(served.exchange(line)[0])
        assert err["code"] == "bad_request"
        assert f"limit is {p.MAX_DEPTH}" in err["message"]
        assert "Recursion" not in err["message"]
    assert served.ask("status")["ok"] is True


@pytest.mark.parametrize("session", [[1], {"a": 1}, 7, True])
def test_call_end_with_a_non_string_session_is_a_bad_request(served, session):
    err = _error(served.exchange(p.encode(p.request(9, "call.end", session=session, call=1)))[0])
    assert err["code"] == "bad_request" and err["message"].startswith("session:")


def test_every_op_answers_a_wrong_type_with_bad_request_naming_the_field(served):
    wrong = {"str": 5, "int": "5", "bool": "yes", "intent": 3, "str_list": ["a", 1]}
    for op, schema in p.SCHEMAS.items():
        # every other field well-typed: the wrong one is the first problem
        fine = {f: spec.choices[0] if spec.choices else
                {"str": "x", "int": spec.lo or 1, "bool": False, "intent": {}, "str_list": []}[spec.kind]
                for f, spec in schema.items()}
        for field, spec in schema.items():
            tries = [("wrong", {**fine, field: wrong[spec.kind]})]
            if spec.required:
                tries.append(("missing", {f: v for f, v in fine.items() if f != field}))
            for why, fields in tries:
                reply = served.exchange(p.encode(p.request(2, op, **fields)))[0]
                err = _error(reply)
                assert err["code"] == "bad_request" and err["message"].startswith(f"{field}:"), (op, why, err)
                assert reply["id"] == 2


def test_a_line_without_newline_is_answered_and_the_stream_closed(served):
    replies = served.exchange(b'{"v":1,"id":1,"op":"status"}\n{"v":1,"id":2,"op":"sta')
    assert replies[0]["ok"] is True
    assert _error(replies[1])["code"] == "bad_request" and len(replies) == 2


def test_bad_requests_are_logged_one_short_line_each_rate_limited(served, records):
    lines = b"".join([b"not json\n", b'{"v":1,"id":1,"op":"nope"}\n', b"[1]\n",
                      b'{"v":1,"id":1,"op":"call.end","session":[1],"call":1}\n'] * 100)
    replies = served.exchange(lines)
    assert len(replies) == 400 and all(r["ok"] is False for r in replies)
    mine = [r for r in records if r.levelno >= logging.INFO]
    # a burst of 5 lines, then 0.2 per second: far fewer lines than bad requests
    assert 1 <= len(mine) <= 6, [r.getMessage() for r in mine]
    assert all(r.exc_info is None and len(r.getMessage()) < 300 for r in mine)


def test_a_client_that_hangs_up_before_its_reply_is_not_an_error(served, records):
    # a long event history: the stream is still being written when the client goes
    event = json.dumps({"time": 1.0, "type": "session.create", "uid": 0, "session": "s", "pad": "x" * 200})
    Path(served.daemon.cfg.event_log_file).write_text((event + "\n") * 5000)
    for i in range(40):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(served.path)
            s.sendall(p.encode(p.request(1, "events" if i % 2 else "session.list")) * 20)
            # reset at once: the replies meet a closed socket
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert served.ask("status")["ok"] is True
    assert [r.getMessage() for r in records if r.levelno > logging.DEBUG] == []


class Buggy(Daemon):
    def op_session_list(self, msg: dict[str, Any], peer: Any) -> dict[str, Any]:
        raise RuntimeError("secret detail of the bug")


def test_a_bug_answers_internal_without_its_text_and_logs_one_traceback(tmp_path, records):
    srv = Served(make_daemon(tmp_path, Buggy), tmp_path / "agentcg.sock")
    try:
        replies = srv.exchange(p.encode(p.request(5, "session.list")) * 50)
    finally:
        srv.close()
    assert len(replies) == 50
    for reply in replies:
        assert reply["id"] == 5 and reply["error"] == {"code": "internal", "message": INTERNAL_MESSAGE}
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert sum(r.exc_info is not None for r in errors) == 1
    assert len(errors) <= 2
