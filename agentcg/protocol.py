"""The agentcgd socket protocol: versioned JSON lines (docs/protocol.md).

One JSON object per line, UTF-8, at most `max_message_bytes` per line
(newline included). Shared by the daemon and the stdlib-only client, so this
module imports only the standard library.

    request  {"v": 1, "id": 7, "op": "call.start", ...fields}
    reply    {"v": 1, "id": 7, "ok": true, ...fields}
             {"v": 1, "id": 7, "ok": false, "error": {"code": "forbidden", "message": "..."}}
    event    {"v": 1, "id": 7, "event": {...}}      (only after an `events` request)
    end      {"v": 1, "id": 7, "end": true}         (an `events` stream without follow is done)
"""
from __future__ import annotations

import array
import json
import os
import socket
from typing import Any, Iterator

VERSION = 1
DEFAULT_SOCKET = "/run/agentcg/agentcg.sock"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

OPS = (
    "status", "session.create", "session.list", "session.show", "session.end",
    "session.attach", "call.start", "call.started", "call.end", "events",
)

# error codes (stable; clients branch on them)
E_BAD_REQUEST = "bad_request"          # not JSON, not an object, missing/ill-typed field
E_TOO_LARGE = "too_large"              # a line longer than the cap; the connection is closed
E_VERSION = "unsupported_version"      # "v" is not a version this daemon speaks
E_UNKNOWN_OP = "unknown_op"
E_NOT_FOUND = "not_found"              # no such session or call
E_EXISTS = "exists"                    # session name taken
E_FORBIDDEN = "forbidden"              # peer uid may not act on this session / pid
E_INVALID_INTENT = "invalid_intent"    # IntentError: names field and value
E_OVER_GRANT = "over_grant"            # session intent above the owner's grant
E_BAD_PID = "bad_pid"                  # pid gone, not the caller's, or not its child
E_BUSY = "busy"                        # session still has running tool calls
E_CGROUP = "cgroup_error"              # the kernel refused a cgroup operation
E_INTERNAL = "internal"

ERROR_CODES = (E_BAD_REQUEST, E_TOO_LARGE, E_VERSION, E_UNKNOWN_OP, E_NOT_FOUND, E_EXISTS,
               E_FORBIDDEN, E_INVALID_INTENT, E_OVER_GRANT, E_BAD_PID, E_BUSY, E_CGROUP, E_INTERNAL)


class ProtocolError(Exception):
    """An error with a protocol code; raised by the daemon's handlers and by
    the client when a reply says ok=false."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class MessageTooLarge(ProtocolError):
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        super().__init__(E_TOO_LARGE, f"message longer than {limit_bytes} bytes")


def encode(message: dict[str, Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """A message as one line. Raises MessageTooLarge rather than send it."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(data) > max_bytes:
        raise MessageTooLarge(max_bytes)
    return data


def decode(line: bytes | str) -> dict[str, Any]:
    """One line -> a message object. Raises ProtocolError(bad_request/version)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(E_BAD_REQUEST, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_REQUEST, f"not a JSON object: {type(obj).__name__}")
    v = obj.get("v")
    if v != VERSION:
        raise ProtocolError(E_VERSION, f"v: {v!r} is not a supported version (this side speaks {VERSION})")
    return obj


def check_request(msg: dict[str, Any]) -> tuple[int, str]:
    """Validate a request's envelope; returns (id, op)."""
    rid = msg.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int):
        raise ProtocolError(E_BAD_REQUEST, f"id: {rid!r} is not an integer")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(E_BAD_REQUEST, f"op: {op!r} is not a string")
    if op not in OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"op: {op!r} is not one of {', '.join(OPS)}")
    return rid, op


def request(rid: int, op: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "op": op, **fields}


def ok_reply(rid: int | None, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "ok": True, **fields}


def error_reply(rid: int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}}


def event_message(rid: int, event: dict[str, Any]) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "event": event}


def end_message(rid: int) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "end": True}


def raise_for_error(reply: dict[str, Any]) -> dict[str, Any]:
    """Return the reply, or raise ProtocolError if it says ok=false."""
    if reply.get("ok") is False:
        err = reply.get("error") or {}
        raise ProtocolError(str(err.get("code", E_INTERNAL)), str(err.get("message", "")))
    return reply


class LineReader:
    """Reads newline-terminated messages from a blocking socket and never
    buffers more than `max_bytes` for one line."""

    MAX_FDS = 4   # file descriptors accepted with one read (SCM_RIGHTS)

    def __init__(self, sock: socket.socket, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.sock = sock
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self.fds: list[int] = []   # received with the data read so far (close-on-exec)

    def _recv(self, n: int) -> bytes:
        recvmsg = getattr(self.sock, "recvmsg", None)
        if recvmsg is None:
            return self.sock.recv(n)
        data, ancdata, _flags, _addr = recvmsg(n, socket.CMSG_SPACE(4 * self.MAX_FDS),
                                               socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        return data

    def take_fds(self) -> list[int]:
        """The file descriptors received so far; the caller owns them now."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            try:
                os.close(fd)
            except OSError:
                pass

    def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > self.max_bytes:
                    raise MessageTooLarge(self.max_bytes)
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line
            if len(self._buf) >= self.max_bytes:
                raise MessageTooLarge(self.max_bytes)
            chunk = self._recv(min(65536, self.max_bytes - len(self._buf) + 1))
            if not chunk:
                if self._buf:
                    raise ProtocolError(E_BAD_REQUEST, "stream ended inside a message")
                return None
            self._buf += chunk

    def messages(self) -> Iterator[dict[str, Any]]:
        while True:
            line = self.readline()
            if line is None:
                return
            yield decode(line)
