"""What a restarted daemon needs so that a restart is invisible to clients.

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
import os
from typing import Any

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
