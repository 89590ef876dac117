"""Restore after a restart: the state file, the journal and the cgroup tree
rebuilt into sessions and calls (`restore`), so that a restart is invisible
to clients.

- the tree is the truth: a session cgroup without state is adopted (owner
  root), a recorded call whose cgroup vanished is reported lost (call.lost),
  an empty unrecorded c-<n> (a spare, or an ended call not yet removed) is
  removed, a populated unrecorded one is adopted with the limits its files hold.
- call.end results outlive the daemon: each call's end line in the journal
  carries its result, and the state file keeps the latest results of live
  sessions (`kept_results`), so that a client whose call.end reply was lost
  in the crash gets the same result when it sends call.end again.
- every ended call is in the event log exactly once: the journal's end line
  is written just before the call.end event, with the event log's size at
  that moment (no await comes between them, so only the last end line of the
  journal can lack its event); `end_logged` tells whether the event made it,
  and a torn event line left by the crash is cut off before it is written again.
- restored calls wait RESTORED_CALL_GRACE_S for their client to reconnect and
  end them with the real exit status, before the watch ends them as orphans.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from agentcg.core.intents import Intent
from agentcg.core.model import Limits

from .state import CallRecord, SessionRecord, load_state

if TYPE_CHECKING:
    from .service import Daemon

log = logging.getLogger("agentcg.daemon")
CALL_DIR_RE = re.compile(r"^c-(\d+)$")

RESTORED_CALL_GRACE_S = 60.0     # twice the clients' default reconnect bound
KEPT_RESULTS = 64                # call.end results written to the state file


def kept_results(finished: dict[tuple[str, int], dict[str, Any]], live: Any,
                 limit: int = KEPT_RESULTS) -> list[dict[str, Any]]:
    """The latest `limit` results of sessions still alive (names in `live`), oldest first."""
    out = [r for (name, _n), r in finished.items() if name in live]
    return out[-limit:] if limit > 0 else []


def end_logged(log_path: str, end: dict[str, Any]) -> bool:
    """Whether the event log holds the call.end event of journal end line `end`
    at the offset it names. False when it does not (then any torn tail at
    that offset is truncated, ready for the event to be written again); True
    when a whole line is there (nothing else is written between the journal
    line and the event) or it cannot tell (no offset, a log that shrank)."""
    offset = end.get("log_bytes")
    if not isinstance(offset, int) or offset < 0:
        return True
    try:
        with open(log_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                return True
            f.seek(offset)
            line = f.readline()
    except FileNotFoundError:
        return offset > 0
    except OSError:
        return True
    if line.endswith(b"\n"):
        try:
            ev = json.loads(line)
        except ValueError:
            ev = None
        if isinstance(ev, dict):
            return True       # written whole (nothing else is written between the two)
    try:
        os.truncate(log_path, offset)     # a torn line: the event is written again whole
    except OSError:
        return True
    return False


def restore(d: "Daemon") -> dict[str, int]:
    """Rebuild d's sessions and calls from the state file and the cgroup tree
    after a restart; returns what it found, by kind."""
    ends: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    _root, saved = load_state(d.cfg.state_file, ends, kept)
    restore_results(d, kept, ends)
    counts = {"sessions": 0, "calls": 0, "adopted": 0, "lost": 0, "removed": 0}
    for name in [c[2:] for c in d.cgfs.children() if c.startswith("s-")]:
        s = saved.get(name)
        if s is None:
            log.warning("adopting session cgroup s-%s found without state (owner: root)", name)
            s = SessionRecord(name=name, uid=0, intent=Intent(), limits=Limits(), created_time=time.time())
            counts["adopted"] += 1
        _restore_calls(d, s, counts)
        d.sessions[name] = s
        counts["sessions"] += 1
    for name in saved:
        if name not in d.sessions:
            log.warning("session %s in the state file has no cgroup any more; dropped", name)
    d.save()
    log.info("restored %(sessions)d sessions, %(calls)d running calls "
             "(%(adopted)d adopted, %(lost)d lost), %(removed)d empty call cgroups removed", counts)
    return counts


def _restore_calls(d: "Daemon", s: SessionRecord, counts: dict[str, int]) -> None:
    """The calls of session s: its records matched with its c-<n> directories."""
    now_ns = time.monotonic_ns()
    dirs = {}
    for c in d.cgfs.children(s.rel):
        m = CALL_DIR_RE.match(c)
        if m:
            dirs[int(m.group(1))] = c
    for n in list(s.calls):
        if n not in dirs:
            lost = s.calls.pop(n)
            counts["lost"] += 1
            d.emit({"type": "call.lost", "uid": lost.uid, "session": s.name, "call": n,
                    "name": lost.name, "reason": "cgroup vanished while the daemon was down"})
    for n in sorted(dirs):
        if n not in s.calls and not d.cgfs.populated(f"{s.rel}/c-{n}"):
            # empty and unrecorded: a spare made ahead, an ended call whose
            # rmdir had not run yet, or a start that never replied; not a call
            if d.cgfs.remove(f"{s.rel}/c-{n}"):
                del dirs[n]
                counts["removed"] += 1
            continue
        if n not in s.calls:
            # no record (state written before the call started): rebuild what the
            # tree knows, the start from the directory's creation, the limits from its files
            rel = f"{s.rel}/c-{n}"
            born = d.cgfs.created_time(rel) or time.time()
            age_ns = max(0, int((time.time() - born) * 1e9))
            s.calls[n] = CallRecord(session=s.name, n=n, name="(adopted)", uid=s.uid, pid=0,
                                    intent=Intent(), limits=Limits.from_dict(d.cgfs.read_limits(rel)),
                                    start_ns=now_ns - age_ns, start_time=born)
            counts["adopted"] += 1
        s.calls[n].conn = None  # its client's connection died with the old daemon
        s.calls[n].reconnect_until_ns = now_ns + int(RESTORED_CALL_GRACE_S * 1e9)
        counts["calls"] += 1
    s.next_call = max([s.next_call] + [n + 1 for n in dirs])


def restore_results(d: "Daemon", kept: list[dict[str, Any]], ends: list[dict[str, Any]]) -> None:
    """call.end results for clients that send call.end again, and the
    call.end event of the journal's last end line if the crash came
    before it was written (end_logged)."""
    for r in kept + [e["result"] for e in ends]:
        if isinstance(r.get("session"), str) and isinstance(r.get("call"), int):
            d.finished[(r["session"], r["call"])] = r
    if ends and not end_logged(d.cfg.event_log_file, ends[-1]):
        log.warning("call %s/%s ended just before the restart: writing its call.end event",
                    ends[-1]["session"], ends[-1]["n"])
        d.emit({"type": "call.end", **ends[-1]["result"]})
