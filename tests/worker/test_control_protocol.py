"""Control socket framing and validation: a real Unix socket, no model needed.

Requests that fail validation never reach the engine, so the server runs here
without one; the ops against the real engine are in test_control_engine.py.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from agentcg.worker.control import (MAX_MESSAGE_BYTES, ControlError, ControlServer, WorkerControl,
                                    parse_request)


def test_parse_request_validates_each_field():
    rid, op, args = parse_request(b'{"v":1,"id":7,"op":"suspend","session":"s1","mode":"drop","ttl_s":30}')
    assert (rid, op, args) == (7, "suspend", {"session_id": "s1", "mode": "drop", "ttl_s": 30})
    assert parse_request(b'{"v":1,"id":1,"op":"suspend","session":"s1"}')[2]["mode"] == "swap"
    assert parse_request(b'{"v":1,"id":2,"op":"shrink","bytes":"1M"}')[2] == {"nbytes": 1 << 20}
    assert parse_request(b'{"v":1,"id":3,"op":"grow","bytes":4096}')[2] == {"nbytes": 4096}

    def line(**fields) -> bytes:
        return json.dumps({"v": 1, "id": 1} | fields).encode()

    # (request, error code, what the message names)
    bad = [(b"nope", "bad_json", "JSON"), (b"[1]", "bad_request", "object"),
           (line(v=2, op="stats"), "bad_version", "v:"), (line(op="explode"), "unknown_op", "op:")]
    fields = {"session:": [dict(op="suspend"), dict(op="suspend", session="a b"), dict(op="resume", session=5)],
              "mode:": [dict(op="suspend", session="s", mode="park")],
              "ttl_s:": [dict(op="suspend", session="s", ttl_s=-1)],
              "bytes:": [dict(op="shrink"), dict(op="shrink", bytes=-5), dict(op="grow", bytes="lots"),
                         dict(op="grow", bytes=True)]}
    bad += [(line(**f), "bad_request", needle) for needle, fs in fields.items() for f in fs]
    assert len(bad) == 13
    for raw, code, needle in bad:
        with pytest.raises(ControlError) as ei:
            parse_request(raw)
        assert ei.value.code == code, raw
        assert needle in ei.value.message, (raw, ei.value.message)


@pytest.fixture
def socket_server(tmp_path):
    """A ControlServer with no engine, in an event loop on a thread."""
    path = tmp_path / "ctl" / "w.sock"          # the directory is created by the server
    loop = asyncio.new_event_loop()
    srv = ControlServer(None, path, mode=0o600)
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert ready.wait(10)
    yield path, srv
    asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)
    loop.close()
    assert not path.exists(), "the socket file is removed on close"


def test_socket_round_trip_and_errors(socket_server):
    path, _ = socket_server
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    with WorkerControl(path, timeout_s=10) as wc:
        assert wc.ping() == {"pong": True}
        with pytest.raises(ControlError) as ei:
            wc.suspend("bad name")
        assert ei.value.code == "bad_request" and "session" in ei.value.message
        # the connection survives an error reply and keeps answering in order
        assert wc.call("ping") == {"pong": True}
        with pytest.raises(ControlError) as ei:
            wc.call("reboot")
        assert ei.value.code == "unknown_op"

    # raw lines: several requests in one write, replies come back in order with their ids
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b'{"v":1,"id":"a","op":"ping"}\n\n{"v":1,"id":"b","op":"nope"}\nnot json\n')
        buf = b""
        while buf.count(b"\n") < 3:
            buf += s.recv(65536)
        replies = [json.loads(x) for x in buf.splitlines()]
        assert [r["id"] for r in replies] == ["a", "b", None]
        assert [r["ok"] for r in replies] == [True, False, False]
        assert replies[2]["error"]["code"] == "bad_json"
        assert all(r["v"] == 1 for r in replies)


def test_oversized_request_is_refused_and_connection_closed(socket_server):
    path, _ = socket_server
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b'{"v":1,"id":1,"op":"ping","pad":"' + b"x" * (MAX_MESSAGE_BYTES + 10))
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        reply = json.loads(buf.splitlines()[0])
        assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    with pytest.raises(ControlError) as ei:
        WorkerControl(path).call("ping", pad="x" * MAX_MESSAGE_BYTES)
    assert ei.value.code == "too_large"


def test_second_server_on_a_live_socket_is_refused_and_stale_one_replaced(socket_server, tmp_path):
    path, _ = socket_server
    with pytest.raises(FileExistsError, match="another process is listening"):
        asyncio.run(ControlServer(None, path).start())
    # a stale socket file (nobody listening) is replaced
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()

    async def start_stop():
        srv = ControlServer(None, stale)
        await srv.start()
        r, w = await asyncio.open_unix_connection(str(stale))
        w.write(b'{"v":1,"id":1,"op":"ping"}\n')
        line = await r.readline()
        w.close()
        await srv.close()
        return json.loads(line)

    assert asyncio.run(start_stop())["result"] == {"pong": True}
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        asyncio.run(ControlServer(None, plain).start())


def test_client_reports_missing_socket(tmp_path):
    with pytest.raises(ControlError) as ei:
        WorkerControl(tmp_path / "none.sock").stats()
    assert ei.value.code == "unavailable" and "none.sock" in ei.value.message
