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
import itertools
import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterator

VERSION = 1
DEFAULT_SOCKET = "/run/agentcg/agentcg.sock"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
# brackets a message may nest; checked before decoding, because the decoder
# recurses once per level (a deep enough line raises RecursionError). A
# request needs 3 (an intent object inside the request object).
MAX_DEPTH = 32

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
    """A message as one line. Raises MessageTooLarge rather than send it.
    A lone surrogate (a request may carry "\\ud800") goes out as its JSON
    escape again: it cannot be encoded as UTF-8."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8", "backslashreplace") + b"\n"
    if len(data) > max_bytes:
        raise MessageTooLarge(max_bytes)
    return data


# a JSON string (escapes included): its brackets do not nest
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting_depth(line: bytes) -> int:
    """How deep the brackets of a JSON text nest, outside strings, without
    decoding it (an unterminated string counts its brackets: such a line is
    not JSON anyway). Linear; the loops run in C."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", line))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is too large for a JSON number here")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(line: bytes | str) -> dict[str, Any]:
    """One line -> a message object. Raises ProtocolError(bad_request/version)."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    # counting brackets is cheap; the exact depth is worked out only past the limit
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and (depth := nesting_depth(raw)) > MAX_DEPTH:
        raise ProtocolError(E_BAD_REQUEST, f"nested {depth} levels deep; the limit is {MAX_DEPTH}")
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError as exc:
        raise ProtocolError(E_BAD_REQUEST, f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise ProtocolError(E_BAD_REQUEST, f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_REQUEST, f"not a JSON object: {type(obj).__name__}")
    v = obj.get("v")
    if v != VERSION or isinstance(v, bool):
        raise ProtocolError(E_VERSION, f"v: {show(v)} is not a supported version (this side speaks {VERSION})")
    return obj


def show(value: Any, limit: int = 60) -> str:
    """repr() for an error message, cut short: a reply must not echo a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reply_id(msg: Any) -> int | None:
    """The id to answer a request with: its own if it has a valid one."""
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if _is_int(rid) else None


def check_request(msg: dict[str, Any]) -> tuple[int, str]:
    """Validate a request's envelope and its op's fields (SCHEMAS); returns
    (id, op). Every field a handler reads has its type checked here first."""
    rid = msg.get("id")
    if not _is_int(rid):
        raise ProtocolError(E_BAD_REQUEST, f"id: {show(rid)} is not an integer")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(E_BAD_REQUEST, f"op: {show(op)} is not a string")
    if op not in OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"op: {show(op)} is not one of {', '.join(OPS)}")
    check_fields(op, msg)
    return rid, op


# -- request fields, one schema per op ---------------------------------------
PID_MAX = (1 << 22)                    # the kernel's largest pid_max
UID_MAX = (1 << 32) - 2                # (uid_t)-1 means "no uid"
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Field:
    """One request field. kind: "str", "int", "bool", "intent" (an object or
    a "key=value,..." string), "str_list". null counts as absent."""
    kind: str
    required: bool = False
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why value does not fit, or None."""
        kind = self.kind
        if kind == "str" and not isinstance(value, str) or kind == "bool" and not isinstance(value, bool):
            return f"is not a {'string' if kind == 'str' else 'boolean'}"
        if kind == "int":
            if not _is_int(value):
                return "is not an integer"
            if self.lo is not None and value < self.lo or self.hi is not None and value > self.hi:
                return f"is outside {self.lo}..{self.hi}"
        if kind == "intent" and not isinstance(value, (dict, str)):
            return "is not an intent (an object or a 'key=value,...' string)"
        if kind == "str_list" and not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
            return "is not a list of strings"
        if self.choices and value not in self.choices:
            return f"is not one of {list(self.choices)}"
        return None


_PID = Field("int", lo=1, hi=PID_MAX)
_CALL = Field("int", required=True, lo=1, hi=INT64_MAX)
_NAME = Field("str", required=True)

# op -> field -> Field. Fields not listed are ignored (a newer client may send
# more); a handler may still refuse a value (a session name's syntax, a pid
# that is not the caller's) with its own code.
SCHEMAS: dict[str, dict[str, Field]] = {
    "status": {},
    "session.create": {"name": _NAME, "intent": Field("intent"), "uid": Field("int", lo=0, hi=UID_MAX),
                       "exist_ok": Field("bool")},
    "session.list": {},
    "session.show": {"name": _NAME},
    "session.attach": {"name": _NAME, "pid": Field("int", required=True, lo=1, hi=PID_MAX)},
    "session.end": {"name": _NAME, "force": Field("bool")},
    "call.start": {"session": _NAME, "pid": _PID, "name": Field("str"), "intent": Field("intent"),
                   "argv": Field("str_list"), "placement": Field("str", choices=("pid", "clone_into"))},
    "call.started": {"session": _NAME, "call": _CALL, "pid": Field("int", required=True, lo=1, hi=PID_MAX)},
    "call.end": {"session": _NAME, "call": _CALL,
                 "exit_status": Field("int", lo=-(1 << 31), hi=(1 << 31) - 1)},
    "events": {"follow": Field("bool"), "history": Field("bool"), "session": Field("str")},
}


def check_fields(op: str, msg: dict[str, Any]) -> None:
    """Raise bad_request naming the first field of `op` that is missing or
    of the wrong type (SCHEMAS)."""
    for name, spec in SCHEMAS.get(op, {}).items():
        value = msg.get(name)
        if value is None:
            if spec.required:
                raise ProtocolError(E_BAD_REQUEST, f"{name}: missing (required by {op})")
            continue
        why = spec.problem(value)
        if why is not None:
            raise ProtocolError(E_BAD_REQUEST, f"{name}: {show(value)} {why}")


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
