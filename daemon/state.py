"""The daemon's records of sessions and tool calls, and the state file.

The state file (`/run/agentcg/state.json`) is rewritten atomically (write a
temporary file, fsync-free rename: /run is tmpfs) after a session changes.
A tool call's start and end go to the journal next to it
(`state.json.journal`) instead: one appended JSON line each, written before
the reply with a single write(2) on a descriptor kept open, so that a call
costs no rewrite of every session and no rename. Rewriting the state file
empties the journal. With the cgroup tree, the state file replayed with its
journal is what a restarted daemon rebuilds from. Replaying is idempotent: a
crash between the rename and the truncation replays lines the state file
holds already.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.core.intents import Intent
from agentcg.core.model import Limits

STATE_VERSION = 1


@dataclass
class CallRecord:
    session: str
    n: int
    name: str
    uid: int
    pid: int
    intent: Intent
    limits: Limits
    start_ns: int            # CLOCK_MONOTONIC, shared by all processes of this boot
    start_time: float        # wall clock, for people
    argv: list[str] = field(default_factory=list)
    conn: int | None = None  # id of the connection that started it; None = orphan
    token: str = ""          # the client's name for its call.start: a resend finds this call
    # restored after a restart: its client has until then to reconnect and end it
    # with the real exit status, before the watch finalises it as orphaned
    reconnect_until_ns: int = 0

    @property
    def rel(self) -> str:
        return f"s-{self.session}/c-{self.n}"

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "n": self.n, "name": self.name, "uid": self.uid,
                "pid": self.pid, "intent": self.intent.to_dict(), "limits": self.limits.to_dict(),
                "start_ns": self.start_ns, "start_time": self.start_time, "argv": self.argv,
                "token": self.token}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CallRecord":
        return cls(session=d["session"], n=int(d["n"]), name=d.get("name", ""), uid=int(d["uid"]),
                   pid=int(d.get("pid", 0)), intent=Intent.parse(d.get("intent") or {}),
                   limits=Limits.from_dict(d.get("limits") or {}), start_ns=int(d["start_ns"]),
                   start_time=float(d.get("start_time", 0.0)), argv=list(d.get("argv") or []),
                   token=str(d.get("token") or ""))


@dataclass
class SessionRecord:
    name: str
    uid: int
    intent: Intent
    limits: Limits
    created_time: float
    next_call: int = 1
    calls: dict[int, CallRecord] = field(default_factory=dict)
    attached: dict[int, str] = field(default_factory=dict)  # pid -> cgroup it came from
    calls_done: int = 0

    @property
    def rel(self) -> str:
        return f"s-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "intent": self.intent.to_dict(),
                "limits": self.limits.to_dict(), "created_time": self.created_time,
                "next_call": self.next_call, "calls_done": self.calls_done,
                "attached": {str(k): v for k, v in self.attached.items()},
                "calls": {str(n): c.to_dict() for n, c in self.calls.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SessionRecord":
        s = cls(name=d["name"], uid=int(d["uid"]), intent=Intent.parse(d.get("intent") or {}),
                limits=Limits.from_dict(d.get("limits") or {}),
                created_time=float(d.get("created_time", 0.0)),
                next_call=int(d.get("next_call", 1)), calls_done=int(d.get("calls_done", 0)))
        s.attached = {int(k): v for k, v in (d.get("attached") or {}).items()}
        s.calls = {int(n): CallRecord.from_dict(c) for n, c in (d.get("calls") or {}).items()}
        return s


def state_json(root: str, sessions: dict[str, SessionRecord],
               finished: list[dict[str, Any]] | None = None) -> str:
    """finished: call.end results kept for clients that resend call.end after a restart."""
    return json.dumps({"version": STATE_VERSION, "cgroup_root": root,
                       "sessions": {name: s.to_dict() for name, s in sessions.items()},
                       "finished": finished or []},
                      separators=(",", ":"))


# the state file, its journal and the event log name every uid's sessions,
# calls and command lines: root only (the socket filters what each uid sees)
PRIVATE_FILE_MODE = 0o600


def open_private(path: str | Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) with mode 0600 from the start (the umask
    can only take bits away from it) and put right if the file existed with
    another mode (left by an older version)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private(path: str | Path) -> bool:
    """Mode 0600 on an existing file; False if there is none."""
    try:
        os.close(open_private(path, os.O_RDONLY))
    except FileNotFoundError:
        return False
    return True


def write_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file next to `path` (created 0600), then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)      # a stale one from a crash, whatever its mode
    except FileNotFoundError:
        pass
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_EXCL), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def journal_path(state_path: str | Path) -> Path:
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + ".journal")


class Journal:
    """The append-only journal of call starts and ends next to the state file."""

    def __init__(self, state_path: str | Path):
        self.path = journal_path(state_path)
        self.fd: int | None = None
        self.lines = 0          # appended since the state file was last rewritten

    def append(self, record: dict[str, Any]) -> None:
        """One JSON line in one write(2) (O_APPEND: a crash never leaves half
        a line in the middle; a torn last line is skipped on replay)."""
        if self.fd is None:
            self.fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        self.lines += 1

    def truncate(self) -> None:
        """After the state file was rewritten: it holds everything the journal said."""
        if self.fd is None:
            try:
                os.truncate(self.path, 0)
            except FileNotFoundError:
                pass
        else:
            os.ftruncate(self.fd, 0)
        self.lines = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def replay(sessions: dict[str, SessionRecord], lines: Any, ends: list[dict[str, Any]] | None = None) -> int:
    """Apply journal lines to sessions loaded from the state file; returns how
    many applied. {"op": "start", "call": CallRecord} adds or replaces a call,
    {"op": "pid", ...} names a clone_into call's pid, {"op": "end", "done": k}
    drops a call (k: the session's calls done with it; its "result", if any,
    is appended to `ends`), {"op": "drop"} drops a call that never started.
    Each line sets rather than adds, so that replaying lines already in the
    state file changes nothing."""
    applied = 0
    for line in lines:
        try:
            rec = json.loads(line)
            op = rec["op"]
            if op == "start":
                c = CallRecord.from_dict(rec["call"])
                s = sessions.get(c.session)
                if s is None:
                    continue
                s.calls[c.n] = c
                s.next_call = max(s.next_call, c.n + 1)
            else:
                s = sessions.get(rec["session"])
                c = s.calls.get(int(rec["n"])) if s is not None else None
                if c is None:
                    continue
                if op == "pid":
                    c.pid = int(rec["pid"])
                elif op == "end":
                    del s.calls[c.n]
                    s.calls_done = max(s.calls_done, int(rec["done"]))
                    if ends is not None and isinstance(rec.get("result"), dict):
                        ends.append(rec)
                elif op == "drop":
                    del s.calls[c.n]
                else:
                    continue
            applied += 1
        except (ValueError, KeyError, TypeError, AttributeError):
            continue   # a torn last line, or one from another version
    return applied


def save_state(path: str | Path, root: str, sessions: dict[str, SessionRecord]) -> None:
    write_atomic(path, state_json(root, sessions))


def load_state(path: str | Path, ends: list[dict[str, Any]] | None = None,
               finished: list[dict[str, Any]] | None = None) -> tuple[str | None, dict[str, SessionRecord]]:
    """(cgroup root the file was written for, sessions); empty when absent or
    unreadable. The journal's end lines that carry a result are appended to
    `ends` and the state file's kept results to `finished`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError):
        return None, {}
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return None, {}
    sessions = {}
    for name, d in (data.get("sessions") or {}).items():
        try:
            sessions[name] = SessionRecord.from_dict(d)
        except (KeyError, ValueError, TypeError):
            continue
    if finished is not None:
        finished.extend(r for r in data.get("finished") or [] if isinstance(r, dict))
    try:
        with open(journal_path(path), "rb") as f:
            replay(sessions, f, ends)
    except OSError:
        pass
    return data.get("cgroup_root"), sessions
