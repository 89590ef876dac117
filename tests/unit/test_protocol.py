"""Protocol framing: versioned JSON lines with a size cap."""
from __future__ import annotations

import socket

import pytest

from agentcg import protocol as p


def test_round_trip_and_envelope():
    line = p.encode(p.request(3, "status"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    msg = p.decode(line)
    assert p.check_request(msg) == (3, "status")


@pytest.mark.parametrize("line,code", [
    (b"not json", p.E_BAD_REQUEST),
    (b"[1,2]", p.E_BAD_REQUEST),
    (b'{"v":2,"id":1,"op":"status"}', p.E_VERSION),
])
def test_decode_errors(line, code):
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(line)
    assert ei.value.code == code


def test_bad_envelope():
    with pytest.raises(p.ProtocolError) as ei:
        p.check_request({"v": 1, "id": 1, "op": "launch"})
    assert ei.value.code == p.E_UNKNOWN_OP
    with pytest.raises(p.ProtocolError) as ei:
        p.check_request({"v": 1, "id": "x", "op": "status"})
    assert ei.value.code == p.E_BAD_REQUEST


def test_encode_refuses_oversized():
    with pytest.raises(p.MessageTooLarge):
        p.encode({"v": 1, "blob": "x" * 2000}, max_bytes=1024)


def test_reader_caps_a_line_without_buffering_it_all():
    a, b = socket.socketpair()
    try:
        a.sendall(p.encode(p.ok_reply(1, x=1)) + b"y" * 5000)
        a.shutdown(socket.SHUT_WR)
        r = p.LineReader(b, max_bytes=1024)
        assert r.readline() == p.encode(p.ok_reply(1, x=1))[:-1]
        with pytest.raises(p.MessageTooLarge):
            r.readline()
        assert len(r._buf) <= 1025
    finally:
        a.close(); b.close()


def test_raise_for_error():
    with pytest.raises(p.ProtocolError) as ei:
        p.raise_for_error(p.error_reply(1, p.E_FORBIDDEN, "not yours"))
    assert ei.value.code == "forbidden" and "not yours" in str(ei.value)


def test_depth_is_bounded_before_decoding_and_strings_do_not_count():
    deep = b'{"v":1,"id":1,"op":"status","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(deep)
    assert ei.value.code == p.E_BAD_REQUEST and f"limit is {p.MAX_DEPTH}" in ei.value.message
    in_string = b'{"v":1,"id":1,"op":"status","x":"' + b"[{" * 5000 + b'\\"]"}'
    assert p.decode(in_string)["x"].startswith("[{")
    assert p.nesting_depth(b'[[{"a":"]]]]"}]]') == 3


@pytest.mark.parametrize("line", [b"\xff\xfe{}", b'{"v":1,"x":NaN}', b'{"v":1,"x":1e999}',
                                  b'{"v":1,"x":-Infinity}', "\ufeff{}".encode("utf-16")])
def test_decode_refuses_what_is_not_utf8_json(line):
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(line)
    assert ei.value.code == p.E_BAD_REQUEST


def test_a_lone_surrogate_goes_back_out_as_its_escape():
    msg = p.decode(b'{"v":1,"name":"a\\ud800b"}')
    assert p.decode(p.encode(msg)) == msg


def test_every_op_has_a_schema_and_messages_are_cut_short():
    assert set(p.SCHEMAS) == set(p.OPS)
    with pytest.raises(p.ProtocolError) as ei:
        p.check_request({"v": 1, "id": 1, "op": "session.show", "name": ["x" * 100_000]})
    assert ei.value.code == p.E_BAD_REQUEST and len(ei.value.message) < 200
    with pytest.raises(p.ProtocolError) as ei:
        p.check_request({"v": 1, "id": 1, "op": "call.end", "session": "s", "call": -1})
    assert ei.value.message.startswith("call:")
    assert p.check_request({"v": 1, "id": 1, "op": "call.end", "session": "s", "call": 1,
                            "exit_status": None, "newer_field": [1]}) == (1, "call.end")
