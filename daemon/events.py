"""The daemon's event log and its live subscribers.

Every event is one JSON line appended to daemon.event_log_file and handed to
every `events` stream whose peer may see it: root sees every event, any
other uid only the events that name it (`"uid"`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Iterator

from .state import open_private

log = logging.getLogger("agentcg.daemon")


def may_see(uid: int | None, event: dict[str, Any]) -> bool:
    """Whether a reader of uid `uid` (None: root) may see `event`."""
    return uid is None or event.get("uid") == uid


class EventLog:
    """emit() writes and fans out; stream() replays the log and follows it."""

    def __init__(self, path: str):
        self.path = path
        self._f: Any = None
        self.subscribers: list[tuple[int | None, asyncio.Queue]] = []

    def emit(self, event: dict[str, Any]) -> None:
        event = {"time": time.time(), **event}
        try:
            if self._f is None:
                self._f = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "a", buffering=1)
            self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
        except OSError as exc:
            log.error("cannot append to event log %s: %s", self.path, exc)
        for uid, q in list(self.subscribers):
            if may_see(uid, event):
                q.put_nowait(event)

    def size_bytes(self) -> int | None:
        """The event log's size: where the next event goes."""
        try:
            if self._f is None:
                self._f = open(self.path, "a", buffering=1)
            return os.fstat(self._f.fileno()).st_size
        except OSError:
            return None

    async def stream(self, uid: int | None, *, session: str | None, follow: bool,
                     history: bool) -> AsyncIterator[dict[str, Any]]:
        """Past events from the log (uid's only, unless None = root), then new ones if follow."""
        q: asyncio.Queue | None = None
        if follow:
            q = asyncio.Queue()
            self.subscribers.append((uid, q))
        try:
            if history:
                for ev in self._history():
                    if may_see(uid, ev) and (session is None or ev.get("session") == session):
                        yield ev
            if q is not None:
                while True:
                    ev = await q.get()
                    if session is None or ev.get("session") == session:
                        yield ev
        finally:
            if q is not None:
                self.subscribers = [(u, qq) for u, qq in self.subscribers if qq is not q]

    def _history(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path) as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
        except FileNotFoundError:
            return
