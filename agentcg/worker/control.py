"""Control API of the inference worker, on a local Unix socket.

The daemon drives the worker's KV cache from tool-call events through this
socket: JSON lines, one request per line, one reply line per request, in order.

    -> {"v":1,"id":1,"op":"suspend","session":"s42","mode":"swap","ttl_s":600}
    <- {"v":1,"id":1,"ok":true,"result":{...}}
    <- {"v":1,"id":1,"ok":false,"error":{"code":"bad_request","message":"mode: ..."}}

Ops and their fields:
    suspend   session (str), mode ("swap" | "keep" | "drop", default "swap"), ttl_s (number, optional)
    resume    session (str)
    shrink    bytes (int, or a size string such as "512M")
    grow      bytes (int, or a size string such as "512M")
    stats     -
    ping      -

The server half runs in the worker's asyncio loop (ControlServer); the client
half (WorkerControl) is stdlib only, so the daemon can import this module
without torch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from agentcg.units import parse_bytes

log = logging.getLogger("agentcg.worker")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024          # one request or reply line, newline included
DEFAULT_SOCKET_PATH = "/run/agentcg/worker.sock"
SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SUSPEND_MODES = ("swap", "keep", "drop")
OPS = ("suspend", "resume", "shrink", "grow", "stats", "ping")


class ControlError(Exception):
    """A request the worker refused or failed; `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id: Any = None


# ---------------------------------------------------------------------------
# validation (pure)

def _session(req: dict) -> str:
    s = req.get("session")
    if not isinstance(s, str) or not SESSION_RE.match(s):
        raise ControlError("bad_request", f"session: expected a name matching {SESSION_RE.pattern}, got {s!r}")
    return s


def _nbytes(req: dict) -> int:
    v = req.get("bytes")
    if isinstance(v, bool) or v is None:
        raise ControlError("bad_request", f"bytes: expected a byte count (int or size string like '512M'), got {v!r}")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str):
        try:
            n = parse_bytes(v)
        except ValueError as e:
            raise ControlError("bad_request", f"bytes: {e}") from None
    else:
        raise ControlError("bad_request", f"bytes: expected a byte count, got {type(v).__name__} {v!r}")
    if n < 0:
        raise ControlError("bad_request", f"bytes: must not be negative, got {n}")
    return n


def parse_request(line: bytes) -> tuple[Any, str, dict]:
    """One request line -> (id, op, validated arguments).

    Raises ControlError; its request_id is the request's id when it had one.
    """
    try:
        req = json.loads(line)
    except ValueError as e:
        raise ControlError("bad_json", f"request is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ControlError("bad_request", f"request: expected a JSON object, got {type(req).__name__}")
    try:
        return _parse_fields(req)
    except ControlError as e:
        e.request_id = req.get("id")
        raise


def _parse_fields(req: dict) -> tuple[Any, str, dict]:
    rid = req.get("id")
    if req.get("v") != PROTOCOL_VERSION:
        raise ControlError("bad_version", f"v: this worker speaks version {PROTOCOL_VERSION}, got {req.get('v')!r}")
    op = req.get("op")
    if op not in OPS:
        raise ControlError("unknown_op", f"op: expected one of {', '.join(OPS)}, got {op!r}")
    args: dict = {}
    if op == "suspend":
        args["session_id"] = _session(req)
        mode = req.get("mode", "swap")
        if mode not in SUSPEND_MODES:
            raise ControlError("bad_request", f"mode: expected one of {', '.join(SUSPEND_MODES)}, got {mode!r}")
        args["mode"] = mode
        ttl = req.get("ttl_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ControlError("bad_request", f"ttl_s: expected a positive number of seconds, got {ttl!r}")
        args["ttl_s"] = ttl
    elif op == "resume":
        args["session_id"] = _session(req)
    elif op in ("shrink", "grow"):
        args["nbytes"] = _nbytes(req)
    return rid, op, args


def _reply(rid: Any, ok: bool, payload: dict) -> bytes:
    msg = {"v": PROTOCOL_VERSION, "id": rid, "ok": ok}
    msg.update(payload)
    return (json.dumps(msg, separators=(",", ":"), default=str) + "\n").encode()


def error_reply(rid: Any, code: str, message: str) -> bytes:
    return _reply(rid, False, {"error": {"code": code, "message": message}})


# ---------------------------------------------------------------------------
# server (runs in the worker's event loop)

class ControlServer:
    """Serves the control ops of one AsyncEngine on a Unix socket.

    The socket file is created with `mode` (default 0o660: owner and group);
    file permissions are the access control. A stale socket file left by a
    dead worker is replaced; a live one is an error.
    """

    def __init__(self, aeng: Any, path: str | os.PathLike, *, mode: int = 0o660):
        self.aeng = aeng
        self.path = Path(path)
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._prepare_path()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=MAX_MESSAGE_BYTES)
        os.chmod(self.path, self.mode)
        log.info("control socket listening on %s", self.path)

    def _prepare_path(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(parents=True, mode=0o755, exist_ok=True)
            except OSError as e:
                raise OSError(e.errno, f"control socket directory {parent}: cannot create it: {e.strerror}") from None
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"control socket {self.path}: exists and is not a socket; remove it or pick "
                                  "another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()              # stale: nobody listens on it
        else:
            raise FileExistsError(f"control socket {self.path}: another process is listening on it")
        finally:
            probe.close()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await self._server.wait_closed()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        writer.write(await self.handle(e.partial))
                    break
                except asyncio.LimitOverrunError:
                    writer.write(error_reply(None, "too_large",
                                             f"request line exceeds {MAX_MESSAGE_BYTES} bytes; connection closed"))
                    break
                if line.strip():
                    writer.write(await self.handle(line))
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def handle(self, line: bytes) -> bytes:
        """One request line -> one reply line."""
        rid = None
        try:
            rid, op, args = parse_request(line)
            result = await self.dispatch(op, args)
        except ControlError as e:
            return error_reply(rid if rid is not None else e.request_id, e.code, e.message)
        except (ValueError, KeyError) as e:
            # The engine refused (unknown session, not enough free blocks, ...).
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            return error_reply(rid, "refused", str(msg))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            log.exception("control op failed")
            return error_reply(rid, "internal", f"{type(e).__name__}: {e}")
        return _reply(rid, True, {"result": result})

    async def dispatch(self, op: str, args: dict) -> Any:
        a = self.aeng
        if op == "ping":
            return {"pong": True}
        if op == "stats":
            return await a.stats()
        if op == "suspend":
            return await a.suspend(args["session_id"], mode=args["mode"], ttl_s=args["ttl_s"])
        if op == "resume":
            return await a.resume(args["session_id"])
        if op == "shrink":
            return await a.shrink(args["nbytes"])
        if op == "grow":
            return await a.grow(args["nbytes"])
        raise ControlError("unknown_op", f"op: {op!r}")


# ---------------------------------------------------------------------------
# client (stdlib only; the daemon uses this)

class WorkerControl:
    """Blocking client of the worker's control socket.

        wc = WorkerControl("/run/agentcg/worker.sock")
        wc.suspend("s42", mode="swap", ttl_s=600)
        wc.resume("s42")
        wc.stats()

    Each method returns the reply's `result` or raises ControlError. One
    connection is kept open and reused; it is re-opened after an error.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_SOCKET_PATH, *, timeout_s: float = 60.0):
        self.path = str(path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def __enter__(self) -> "WorkerControl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, **fields: Any) -> Any:
        rid = self._next_id
        self._next_id += 1
        msg = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
        msg.update({k: v for k, v in fields.items() if v is not None})
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise ControlError("too_large", f"request is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
        try:
            sock = self._connect()
            sock.sendall(data)
            line = self._read_line(sock)
        except FileNotFoundError:
            self.close()
            raise ControlError("unavailable", f"control socket {self.path}: no such file; is agentcg-worker "
                                              "running with --control-socket there?") from None
        except (OSError, ValueError) as e:
            self.close()
            raise ControlError("unavailable", f"control socket {self.path}: {e}") from None
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            raise ControlError("bad_reply", f"control socket {self.path}: reply is not JSON: {line[:200]!r}") from None
        if not isinstance(reply, dict) or reply.get("id") not in (rid, None):
            self.close()
            raise ControlError("bad_reply", f"control socket {self.path}: unexpected reply {str(reply)[:200]}")
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ControlError(str(err.get("code", "error")), str(err.get("message", "request failed")))
        return reply.get("result")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout_s)
            try:
                s.connect(self.path)
            except BaseException:
                s.close()
                raise
            self._sock = s
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > 64 * MAX_MESSAGE_BYTES:
                raise ValueError("reply line too long")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("worker closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    # the ops
    def ping(self) -> dict:
        return self.call("ping")

    def suspend(self, session: str, mode: str = "swap", ttl_s: float | None = None) -> dict:
        return self.call("suspend", session=session, mode=mode, ttl_s=ttl_s)

    def resume(self, session: str) -> dict:
        return self.call("resume", session=session)

    def shrink(self, nbytes: int | str) -> dict:
        return self.call("shrink", bytes=nbytes)

    def grow(self, nbytes: int | str) -> dict:
        return self.call("grow", bytes=nbytes)

    def stats(self) -> dict:
        return self.call("stats")
