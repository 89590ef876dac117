"""asyncio variant of the agentcg client. Standard library only.

    from agentcg.client.aio import AsyncClient
    async with AsyncClient() as client:
        async with await client.session("agent-1", intent="memory=4G") as session:
            result = await session.run(["pytest", "-q"], intent="memory=1G")
            print(result.exit_status, result.feedback)

Placement works as in the blocking client: the command starts as a /bin/sh
trampoline blocked on a pipe, the daemon places its pid, then the pipe is
written and the trampoline execs the command.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
from typing import Any, AsyncIterator, Sequence

from agentcg import protocol as p
from agentcg.client.core import (CONNECTION_LOST, PY_TRAMPOLINE, SH_TRAMPOLINE, Attempts, CallResult,
                                 DaemonUnavailable, call_token, default_socket_path, exit_status,
                                 give_up_at_once, intent_field, unavailable)
from agentcg.client.core import reconnect_timeout_s as _reconnect_bound_s

__all__ = ["AsyncClient", "AsyncSession"]


class AsyncClient:
    def __init__(self, socket_path: str | None = None, *, max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES,
                 reconnect_timeout_s: float | None = None, wait_for_daemon: bool = False):
        """reconnect_timeout_s and wait_for_daemon as in agentcg.client.Client."""
        self.socket_path = socket_path or default_socket_path()
        self.reconnect_timeout_s = _reconnect_bound_s(reconnect_timeout_s)
        self.wait_for_daemon = wait_for_daemon
        self._reached = False
        self.max_bytes = max_message_bytes
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._ids = 0
        self._lock = asyncio.Lock()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.socket_path, limit=self.max_bytes)
        except OSError as exc:
            raise unavailable(self.socket_path, exc) from None

    async def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def request(self, op: str, *, retry_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """As Client.request: a lost connection is re-established with backoff
        and the request sent again, within retry_s (default reconnect_timeout_s)."""
        attempts = Attempts(op, fields, self.reconnect_timeout_s if retry_s is None else retry_s)
        while True:
            try:
                return await self._request_once(op, attempts.fields)
            except CONNECTION_LOST as exc:
                await self.close()
                if retry_s is None and give_up_at_once(self._reached, self.wait_for_daemon, exc):
                    raise
                await asyncio.sleep(attempts.next_delay(exc))
            except p.ProtocolError as exc:
                return attempts.after_error(exc)

    async def _request_once(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self._rw is None:
                self._rw = await self._open()
                self._reached = True
            reader, writer = self._rw
            self._ids += 1
            rid = self._ids
            writer.write(p.encode(p.request(rid, op, **fields), self.max_bytes))
            await writer.drain()
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    raise p.MessageTooLarge(self.max_bytes) from None
                if not line:
                    raise EOFError("agentcgd closed the connection")
                msg = p.decode(line)
                if msg.get("id") in (rid, None):
                    return p.raise_for_error(msg)

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def sessions(self) -> list[dict[str, Any]]:
        return (await self.request("session.list"))["sessions"]

    async def session(self, name: str, intent: Any = None, *, uid: int | None = None,
                      exist_ok: bool = False, end_on_exit: bool = True) -> "AsyncSession":
        fields: dict[str, Any] = {"name": name, "intent": intent_field(intent), "exist_ok": exist_ok}
        if uid is not None:
            fields["uid"] = uid
        reply = await self.request("session.create", **fields)
        return AsyncSession(self, name, reply["session"], end_on_exit)

    async def events(self, follow: bool = False, session: str | None = None) -> AsyncIterator[dict[str, Any]]:
        reader, writer = await self._open()
        try:
            fields: dict[str, Any] = {"follow": follow}
            if session is not None:
                fields["session"] = session
            writer.write(p.encode(p.request(1, "events", **fields), self.max_bytes))
            await writer.drain()
            p.raise_for_error(p.decode(await reader.readline()))
            while True:
                line = await reader.readline()
                if not line:
                    return
                msg = p.decode(line)
                if msg.get("end"):
                    return
                if "event" in msg:
                    yield msg["event"]
        finally:
            writer.close()


class AsyncSession:
    def __init__(self, client: AsyncClient, name: str, info: dict[str, Any], end_on_exit: bool):
        self.client = client
        self.name = name
        self.info = info
        self.end_on_exit = end_on_exit

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.end_on_exit:
            await self.end()

    async def end(self, force: bool = False) -> dict[str, Any]:
        return await self.client.request("session.end", name=self.name, force=force)

    async def attach(self, pid: int | None = None) -> dict[str, Any]:
        return await self.client.request("session.attach", name=self.name, pid=pid or os.getpid())

    async def run(self, argv: Sequence[str], intent: Any = None, name: str = "",
                  **subprocess_kwargs: Any) -> CallResult:
        """Run `argv` as one tool call; stdout/stderr as in asyncio.create_subprocess_exec."""
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise ValueError("argv: empty command")
        env = subprocess_kwargs.get("env")
        if "/" not in argv[0] and shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        r, w = os.pipe()
        try:
            if r <= 9:
                tramp = ["/bin/sh", "-c", SH_TRAMPOLINE.format(fd=r), "agentcg-call", *argv]
            else:
                tramp = [sys.executable, "-S", "-c", PY_TRAMPOLINE, str(r), *argv]
            proc = await asyncio.create_subprocess_exec(*tramp, pass_fds=(r,), **subprocess_kwargs)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        try:
            reply = await self.client.request("call.start", session=self.name, name=name or os.path.basename(argv[0]),
                                              intent=intent_field(intent), pid=proc.pid, argv=argv,
                                              token=call_token())
        except BaseException:
            os.close(w)
            await proc.wait()
            raise
        try:
            os.write(w, b"go\n")
        finally:
            os.close(w)
        out, err = await proc.communicate()
        rc = proc.returncode
        unaccounted = None
        try:
            end = await self.client.request("call.end", session=self.name, call=reply["call"],
                                            exit_status=exit_status(rc))
        except (DaemonUnavailable, p.ProtocolError) as exc:
            end = {}     # the command's status is ours: only the accounting is lost
            unaccounted = f"call {reply['call']} of session {self.name} could not be accounted: {exc}"
        return CallResult(exit_status=exit_status(rc), returncode=rc, session=self.name, call=reply["call"],
                          stats=end.get("stats", {}), limits=end.get("limits", {}),
                          feedback=end.get("feedback", []), stdout=out, stderr=err, reply=end,
                          unaccounted=unaccounted)
