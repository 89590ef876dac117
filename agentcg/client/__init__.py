"""agentcg client: talk to agentcgd over its Unix socket. Standard library only.

    from agentcg.client import Client
    client = Client()                                   # $AGENTCG_SOCKET or /run/agentcg/agentcg.sock
    with client.session("agent-1", intent="memory=4G") as session:
        with session.tool_call("pytest", intent="memory=1G,cpu=batch") as call:
            result = call.run(["pytest", "-q", "tests/test_x.py"])
        print(result.exit_status, result.stats["memory_peak_bytes"])
        for item in result.feedback:
            print(item["message"], item["suggestion"])

Placement: where the kernel has CLONE_INTO_CGROUP (Linux >= 5.7), the
caller may create processes in the daemon's tree (root) and the client can
start a child safely (posix_spawn with POSIX_SPAWN_SETCGROUP, glibc >= 2.39,
or the C spawn helper: see _clone.py), the daemon sends the new call
cgroup's directory fd over the socket (SCM_RIGHTS) and the child is born
inside it, then execs the command; the client names the pid with
`call.started`. Otherwise (older kernels, unprivileged callers, Popen
options such as PIPEs, neither way to spawn) the command starts as a tiny /bin/sh trampoline that
blocks on a pipe; the daemon moves its pid into the tool call's cgroup; only
then does the client write to the pipe and the trampoline exec()s the
command. Either way the tool never runs an instruction outside its cgroup.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

from agentcg import protocol as p
from agentcg.protocol import ProtocolError

from . import _clone
from .core import (CONNECTION_LOST, PY_TRAMPOLINE, SH_TRAMPOLINE, Attempts, CallResult, DaemonUnavailable,
                   call_token, default_socket_path, exit_status, give_up_at_once, intent_field,
                   unavailable)
from .core import reconnect_timeout_s as _reconnect_bound_s

__all__ = ["Client", "Session", "ToolCall", "CallResult", "CallHandle", "ProtocolError",
           "DaemonUnavailable", "default_socket_path"]

_intent = intent_field


class Client:
    """One connection to agentcgd (opened on first use, reopened after a
    daemon restart). Safe to share between threads."""

    def __init__(self, socket_path: str | None = None, *, max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES,
                 timeout_s: float | None = 60.0, clone_into: bool | None = None,
                 reconnect_timeout_s: float | None = None, wait_for_daemon: bool = False):
        """clone_into: start commands born inside their cgroup (True),
        never (False), or when running as root (None, the default). A refusal
        (kernel without it, no permission, an older daemon) falls back to the
        waiting-child placement for the rest of this client's life.

        reconnect_timeout_s: once the daemon was reached, how long a request
        waits for it to come back (a restart) before DaemonUnavailable;
        default $AGENTCG_RECONNECT_TIMEOUT_S, else 30 s. wait_for_daemon:
        wait so long for the first connection too when the daemon's socket
        is there but refuses (a daemon being restarted); default: fail at
        once when no daemon listens."""
        self.clone_into = (os.geteuid() == 0) if clone_into is None else clone_into
        self.reconnect_timeout_s = _reconnect_bound_s(reconnect_timeout_s)
        self.wait_for_daemon = wait_for_daemon
        self._reached = False
        self.socket_path = socket_path or default_socket_path()
        self.max_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader: p.LineReader | None = None
        self._ids = 0
        self._pending: dict[int, Any] = {}   # id -> callback(reply) of requests sent without waiting
        self._lock = threading.Lock()

    # -- transport -------------------------------------------------------
    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.socket_path)
        except OSError as exc:
            s.close()
            raise unavailable(self.socket_path, exc) from None
        return s

    def _ensure_connected(self) -> None:
        if self._sock is None:
            self._sock = self._connect()
            self._reader = p.LineReader(self._sock, self.max_bytes)
            self._reached = True

    def _drop_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._reader = None
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, op: str, *, retry_s: float | None = None, fds_out: list[int] | None = None,
                **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; raises ProtocolError on ok=false.
        A lost connection is re-established with backoff (the daemon may be
        restarting) and the request sent again, for up to retry_s (default:
        the client's reconnect_timeout_s; none before the daemon was first
        reached, unless wait_for_daemon). File descriptors sent with the
        reply are appended to `fds_out` (the caller closes them), or closed
        when it is None."""
        attempts = Attempts(op, fields, self._retry_bound(retry_s))
        while True:
            try:
                return self._request_once(op, attempts.fields, fds_out)
            except CONNECTION_LOST as exc:
                self.close()
                if retry_s is None and give_up_at_once(self._reached, self.wait_for_daemon, exc):
                    raise
                time.sleep(attempts.next_delay(exc))
            except ProtocolError as exc:
                return attempts.after_error(exc)

    def _retry_bound(self, retry_s: float | None) -> float:
        return self.reconnect_timeout_s if retry_s is None else retry_s

    def _request_once(self, op: str, fields: dict[str, Any], fds_out: list[int] | None = None) -> dict[str, Any]:
        with self._lock:
            self._ensure_connected()
            self._ids += 1
            rid = self._ids
            self._sock.sendall(p.encode(p.request(rid, op, **fields), self.max_bytes))
            while True:
                line = self._reader.readline()
                if line is None:
                    raise EOFError("agentcgd closed the connection")
                msg = p.decode(line)
                if msg.get("id") in (rid, None):
                    break
                # a reply read on the way (to call.started, sent without waiting)
                # carries no fds: any received came with the awaited reply
                callback = self._pending.pop(msg.get("id"), None)
                if callback is not None:
                    callback(msg)
            fds = self._reader.take_fds()
        if fds_out is None or not msg.get("ok"):
            for fd in fds:
                os.close(fd)
        else:
            fds_out.extend(fds)
        return p.raise_for_error(msg)

    def send(self, op: str, on_reply: Any, **fields: Any) -> None:
        """Send a request without waiting: its reply is handed to
        on_reply(message) while a later request reads its own reply."""
        with self._lock:
            try:
                self._ensure_connected()
                self._ids += 1
                self._pending[self._ids] = on_reply
                self._sock.sendall(p.encode(p.request(self._ids, op, **fields), self.max_bytes))
            except CONNECTION_LOST:
                # the daemon is away: no reply will come; the next request reconnects
                self._drop_connection()

    def flush(self) -> None:
        """Read the replies of requests sent without waiting (see send)."""
        with self._lock:
            try:
                while self._pending and self._reader is not None:
                    line = self._reader.readline()
                    if line is None:
                        raise EOFError("agentcgd closed the connection")
                    msg = p.decode(line)
                    self._reader.close_fds()
                    callback = self._pending.pop(msg.get("id"), None)
                    if callback is not None:
                        callback(msg)
            except (OSError, EOFError, ProtocolError):
                self._drop_connection()   # the connection is lost; the next request reconnects

    # -- API --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.request("status")

    def sessions(self) -> list[dict[str, Any]]:
        return self.request("session.list")["sessions"]

    def show(self, name: str) -> dict[str, Any]:
        return self.request("session.show", name=name)["session"]

    def session(self, name: str, intent: Any = None, *, uid: int | None = None, exist_ok: bool = False,
                end_on_exit: bool = True) -> "Session":
        """Create a session now; as a context manager it is ended on exit."""
        fields: dict[str, Any] = {"name": name, "intent": _intent(intent), "exist_ok": exist_ok}
        if uid is not None:
            fields["uid"] = uid
        reply = self.request("session.create", **fields)
        return Session(self, name, reply["session"], end_on_exit=end_on_exit)

    def get_session(self, name: str) -> "Session":
        """A handle on an existing session (not ended on exit)."""
        return Session(self, name, self.show(name), end_on_exit=False)

    def events(self, follow: bool = False, session: str | None = None,
               history: bool = True) -> Iterator[dict[str, Any]]:
        """Events from the daemon's log (yours only, unless root); with follow,
        new ones as they happen, until the iterator is closed."""
        sock = self._connect()
        sock.settimeout(None if follow else self.timeout_s)
        try:
            reader = p.LineReader(sock, self.max_bytes)
            fields: dict[str, Any] = {"follow": follow, "history": history}
            if session is not None:
                fields["session"] = session
            sock.sendall(p.encode(p.request(1, "events", **fields), self.max_bytes))
            first = reader.readline()
            if first is None:
                raise DaemonUnavailable("agentcgd closed the connection")
            p.raise_for_error(p.decode(first))
            for msg in reader.messages():
                if msg.get("end"):
                    return
                if "event" in msg:
                    yield msg["event"]
        finally:
            sock.close()


class Session:
    def __init__(self, client: Client, name: str, info: dict[str, Any], *, end_on_exit: bool):
        self.client = client
        self.name = name
        self.info = info
        self.end_on_exit = end_on_exit

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.end_on_exit:
            self.end()

    def end(self, force: bool = False) -> dict[str, Any]:
        return self.client.request("session.end", name=self.name, force=force)

    def llm_headers(self) -> dict[str, str]:
        """HTTP headers for the agent's requests to agentcg-worker: they tie its
        KV cache to this session, which agentcgd then swaps out during tool calls
        and back before the next turn (docs/gpu.md)."""
        return {"X-Agentcg-Session": self.name}

    def show(self) -> dict[str, Any]:
        return self.client.show(self.name)

    def attach(self, pid: int | None = None) -> dict[str, Any]:
        """Move a process of yours (default: this one) into the session's agent cgroup."""
        return self.client.request("session.attach", name=self.name, pid=pid or os.getpid())

    def tool_call(self, name: str = "", intent: Any = None) -> "ToolCall":
        return ToolCall(self, name, intent)

    def run(self, argv: Sequence[str], intent: Any = None, name: str = "", **popen_kwargs: Any) -> CallResult:
        """Shortcut: one tool call running `argv`."""
        return self.tool_call(name or os.path.basename(argv[0]), intent).run(argv, **popen_kwargs)


class ToolCall:
    """A tool call to be. `run()`/`popen()` start it; one command per ToolCall."""

    def __init__(self, session: Session, name: str, intent: Any):
        self.session = session
        self.name = name
        self.intent = intent
        self.handle: CallHandle | None = None

    def __enter__(self) -> "ToolCall":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None and self.handle.result is None:
            self.handle.kill()
            self.handle.wait()

    def popen(self, argv: Sequence[str], **popen_kwargs: Any) -> "CallHandle":
        if self.handle is not None:
            raise RuntimeError("this tool call already ran a command; open a new tool_call()")
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise ValueError("argv: empty command")
        env = popen_kwargs.get("env")
        if "/" not in argv[0] and shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        client = self.session.client
        if client.clone_into and _clone.supported(popen_kwargs) and _clone.method() is not None:
            handle = self._popen_clone_into(argv, popen_kwargs)
            if handle is not None:
                return handle
        proc, w = self._waiting_child(argv, popen_kwargs)
        try:
            reply = client.request("call.start", session=self.session.name, name=self.name,
                                   intent=_intent(self.intent), pid=proc.pid, argv=argv, token=call_token())
        except BaseException:
            os.close(w)  # the trampoline exits 125 without running the command
            proc.wait()
            raise
        try:
            os.write(w, b"go\n")
        finally:
            os.close(w)
        self.handle = CallHandle(self, proc, reply)
        return self.handle

    def _waiting_child(self, argv: list[str], popen_kwargs: dict[str, Any]) -> tuple[subprocess.Popen, int]:
        """A trampoline child that execs argv once a line arrives on the returned fd."""
        r, w = os.pipe()
        pass_fds = tuple(popen_kwargs.pop("pass_fds", ()))
        try:
            if r <= 9:
                tramp = ["/bin/sh", "-c", SH_TRAMPOLINE.format(fd=r), "agentcg-call", *argv]
            else:
                tramp = [sys.executable, "-S", "-c", PY_TRAMPOLINE, str(r), *argv]
            proc = subprocess.Popen(tramp, pass_fds=pass_fds + (r,), **popen_kwargs)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        os.close(r)
        return proc, w

    def _popen_clone_into(self, argv: list[str], popen_kwargs: dict[str, Any]) -> "CallHandle | None":
        """Start argv born inside its call cgroup; None when the daemon does not
        offer clone_into (the caller then uses the waiting child)."""
        client = self.session.client
        sname = self.session.name
        prep = _clone.Prepared(argv, **popen_kwargs)   # FileNotFoundError before any call starts
        try:
            fds: list[int] = []
            try:
                reply = client.request("call.start", fds_out=fds, session=sname, name=self.name,
                                       intent=_intent(self.intent), argv=argv, placement="clone_into",
                                       token=call_token())
            except ProtocolError as exc:
                if exc.code == p.E_BAD_REQUEST and ("pid" in exc.message or "placement" in exc.message):
                    client.clone_into = False      # a daemon without clone_into
                    return None
                raise
            n = reply["call"]
            started: list[dict[str, Any]] = []
            proc: Any = None
            w = -1
            try:
                if not fds:
                    raise ProtocolError(p.E_INTERNAL, "call.start: no cgroup fd came with the reply")
                try:
                    proc = _clone.spawn(prep, fds[0], reply.get("oom_score_adj"))
                except OSError as exc:
                    if exc.errno not in _clone.FALLBACK_ERRNOS:
                        raise
                    client.clone_into = False      # refused: place a waiting child instead
                if proc is None:                   # refused, or no safe way to spawn here
                    proc, w = self._waiting_child(argv, dict(popen_kwargs))
                if w >= 0:   # the daemon must place it before it may exec
                    started.append(client.request("call.started", session=sname, call=n, pid=proc.pid))
                else:        # born inside: the reply is read with the next request
                    client.send("call.started", started.append, session=sname, call=n, pid=proc.pid)
            except BaseException:
                if w >= 0:
                    os.close(w)
                if proc is not None:
                    proc.kill()
                    proc.wait()
                try:
                    client.request("call.end", session=sname, call=n, exit_status=None)
                except (ProtocolError, ConnectionError):
                    pass
                raise
            finally:
                for fd in fds:
                    os.close(fd)
            if w >= 0:
                try:
                    os.write(w, b"go\n")
                finally:
                    os.close(w)
            error = None
            if getattr(proc, "exec_errno", None):
                error = f"cannot execute {argv[0]}: {os.strerror(proc.exec_errno)}"
                try:
                    os.write(prep.stderr_fd, f"agentcg: {error}\n".encode())
                except OSError:
                    pass
        finally:
            prep.close()
        self.handle = CallHandle(self, proc, reply)
        self.handle.error = error
        self.handle.started = started
        if w >= 0:
            self.handle.placement = "pid"
        return self.handle

    def run(self, argv: Sequence[str], *, input: bytes | str | None = None, **popen_kwargs: Any) -> CallResult:
        if input is not None:
            popen_kwargs.setdefault("stdin", subprocess.PIPE)
        h = self.popen(argv, **popen_kwargs)
        return h.wait(input=input)


class CallHandle:
    """A running tool call: `.pid`, `.proc` (the subprocess.Popen), `.wait()`."""

    def __init__(self, call: ToolCall, proc: subprocess.Popen, reply: dict[str, Any]):
        self.call = call
        self.proc = proc
        self.pid = proc.pid
        self.number: int = reply["call"]
        self.cgroup: str = reply["cgroup"]
        self.limits: dict[str, Any] = reply["limits"]
        self.adjustments: list[dict[str, Any]] = reply.get("adjustments", [])
        self.placement: str = reply.get("placement", "pid")
        self.error: str | None = None
        self.started: list[dict[str, Any]] = []   # call.started's reply, once read
        self.result: CallResult | None = None

    @property
    def stdin(self):
        return self.proc.stdin

    @property
    def stdout(self):
        return self.proc.stdout

    @property
    def stderr(self):
        return self.proc.stderr

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, input: bytes | str | None = None, timeout: float | None = None) -> CallResult:
        """Wait for the command, then end the tool call; returns its result."""
        if self.result is not None:
            return self.result
        if input is not None or self.proc.stdout is not None or self.proc.stderr is not None:
            out, err = self.proc.communicate(input=input, timeout=timeout)
        else:
            if self.placement == "clone_into" and not self.started:
                # the daemon checks the pid named by call.started: keep it
                # (a zombie) until that reply is in, then reap
                if not self.proc.wait_exited(timeout):
                    raise subprocess.TimeoutExpired(self.proc.args, timeout)
                self.call.session.client.flush()
            self.proc.wait(timeout=timeout)
            out = err = None
        rc = self.proc.returncode
        session = self.call.session
        unaccounted = None
        try:
            reply = session.client.request("call.end", session=session.name, call=self.number,
                                           exit_status=exit_status(rc))
        except (DaemonUnavailable, ProtocolError) as exc:
            # the command's status is ours (we reaped it): only the accounting is lost
            reply = {}
            unaccounted = f"call {self.number} of session {session.name} could not be accounted: {exc}"
        for msg in self.started:
            if not msg.get("ok") and self.error is None:
                problem = msg.get("error") or {}
                self.error = f"call.started: {problem.get('code')}: {problem.get('message')}"
        self.result = CallResult(exit_status=exit_status(rc), returncode=rc, session=session.name,
                                 call=self.number, stats=reply.get("stats", {}), limits=reply.get("limits", {}),
                                 feedback=reply.get("feedback", []), stdout=out, stderr=err, reply=reply,
                                 error=self.error, unaccounted=unaccounted)
        return self.result
