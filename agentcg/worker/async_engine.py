"""Runs an Engine on one dedicated thread and exposes it to asyncio code.

The engine is single-threaded: every call into it (add_request, abort, step,
suspend, resume, shrink, grow, stats) happens on the engine thread. Other
threads talk to it through a command queue; each command carries a
concurrent.futures.Future that the engine thread completes with the result or
the exception, so errors reach the caller unchanged.

Token events are handed to the event loop that submitted the request with
loop.call_soon_threadsafe, into a per-request asyncio.Queue.

    aeng = AsyncEngine(engine)
    aeng.start()
    async for ev in aeng.generate(req):    # TokenEvent, last one has finished=True
        ...
    aeng.close()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("agentcg.worker")

# How long the engine thread sleeps on an empty command queue when the engine
# has nothing to do. Any command wakes it at once; this only bounds how late a
# stop request is noticed when no command is sent.
IDLE_WAIT_S = 0.5


class EngineClosed(RuntimeError):
    """The engine thread has stopped; no new work is accepted."""


class GenerationFailed(RuntimeError):
    """The engine raised while stepping a request; the original is the __cause__."""


@dataclass
class _Stream:
    """Where the events of one request go: a queue living in `loop`."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            pass


class RequestStream:
    """The events of one submitted request, as an async iterator.

    Iterating ends after the event with finished=True. Leaving early (break,
    cancellation, a client that went away) aborts the request in the engine,
    which frees its KV blocks; so does close().
    """

    def __init__(self, owner: "AsyncEngine", request_id: str, stream: _Stream):
        self._owner = owner
        self.request_id = request_id
        self._stream = stream
        self.finished = False
        self.finish_reason: str | None = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._stream.queue.get()
        except BaseException:
            # Cancelled while waiting (client gone, timeout): give the blocks back.
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            self.finish_reason = item.finish_reason
        return item

    def close(self) -> None:
        """Abort the request unless it already finished. Safe from any context."""
        if not self.finished:
            self.finished = True
            self.finish_reason = "abort"
            self._owner._abort_nowait(self.request_id)

    async def aclose(self) -> None:
        self.close()


class AsyncEngine:
    """One thread that owns the engine; asyncio-friendly wrappers around it."""

    def __init__(self, engine: Any, *, name: str = "agentcg-engine"):
        self.engine = engine
        self._name = name
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}      # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        # Counters of the front end, reported next to the engine's own stats.
        self.counters = {"requests": 0, "finished": 0, "aborted": 0, "failed": 0}

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> "AsyncEngine":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread. Requests still running end with EngineClosed."""
        if self._closed:
            return
        self._closed = True
        self._cmds.put(("stop", None, None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> "AsyncEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ---- submitting work -------------------------------------------------

    def call_sync(self, fn: Callable[[Any], Any], timeout_s: float | None = None) -> Any:
        """Run fn(engine) on the engine thread and wait for its result (blocking)."""
        return self._submit(fn).result(timeout_s)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread; await its result or exception."""
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        if self._closed or self._thread is None:
            raise EngineClosed("the inference engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", fn, fut))
        return fut

    async def submit(self, req: Any) -> RequestStream:
        """Add a request; returns once the engine accepted it (errors raise here)."""
        stream = _Stream(asyncio.get_running_loop())
        rid = req.request_id

        def add(engine: Any) -> None:
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already running")
            engine.add_request(req)
            self._streams[rid] = stream
            self.counters["requests"] += 1

        await self.call(add)
        return RequestStream(self, rid, stream)

    async def generate(self, req: Any) -> AsyncIterator[Any]:
        """Submit `req` and yield its TokenEvents; leaving early aborts it."""
        rs = await self.submit(req)
        try:
            async for ev in rs:
                yield ev
        finally:
            rs.close()

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False when it is not running (any more)."""
        return await self.call(lambda engine: self._abort_on_thread(request_id))

    def _abort_nowait(self, request_id: str) -> None:
        if self._closed:
            return
        self._cmds.put(("call", lambda engine: self._abort_on_thread(request_id), None))

    def _abort_on_thread(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        self.engine.abort(request_id)
        self.counters["aborted"] += 1
        return True

    # ---- control operations (all on the engine thread) -----------------

    async def suspend(self, session_id: str, mode: str = "swap", ttl_s: float | None = None) -> dict:
        return await self.call(lambda e: e.suspend(session_id, mode=mode, ttl_s=ttl_s))

    async def resume(self, session_id: str) -> dict:
        return await self.call(lambda e: e.resume(session_id))

    async def shrink(self, nbytes: int) -> dict:
        return await self.call(lambda e: e.shrink(nbytes))

    async def grow(self, nbytes: int) -> dict:
        return await self.call(lambda e: e.grow(nbytes))

    async def stats(self) -> dict:
        return await self.call(self._stats_on_thread)

    def _stats_on_thread(self, engine: Any) -> dict:
        out = dict(engine.stats())
        out["api"] = dict(self.counters, running=len(self._streams))
        return out

    # ---- the engine thread ----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_work()
                try:
                    cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if self._run_command(cmd):
                        return
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self.engine.has_work():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - the thread must not die silently
            log.exception("engine thread stopped by an error")
            self._fail_all(GenerationFailed(f"inference engine stopped: {e}"))
            self._closed = True
            self._drain_commands(EngineClosed(f"inference engine stopped: {e}"))
        finally:
            self._closed = True

    def _run_command(self, cmd: tuple) -> bool:
        """Run one command; True when it was the stop command."""
        kind, fn, fut = cmd
        if kind == "stop":
            self._fail_all(EngineClosed("the inference engine is shutting down"), abort=True)
            self._drain_commands(EngineClosed("the inference engine is shutting down"))
            return True
        if fut is not None and not fut.set_running_or_notify_cancel():
            return False
        try:
            result = fn(self.engine)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            if fut is not None:
                fut.set_exception(e)
            else:
                log.warning("engine command failed: %s", e)
        else:
            if fut is not None:
                fut.set_result(result)
        return False

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the %d running requests", len(self._streams))
            err = GenerationFailed(f"inference engine step failed: {type(e).__name__}: {e}")
            err.__cause__ = e
            self._fail_all(err, abort=True)
            return
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is None:
                continue        # aborted by its client a moment ago
            if ev.finished:
                del self._streams[ev.request_id]
                self.counters["finished"] += 1
            stream.put(ev)

    def _fail_all(self, err: BaseException, abort: bool = False) -> None:
        for rid, stream in list(self._streams.items()):
            if abort:
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001 - best effort while failing
                    pass
            self.counters["failed"] += 1
            stream.put(err)
        self._streams.clear()

    def _drain_commands(self, err: BaseException) -> None:
        while True:
            try:
                _, _, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(err)
