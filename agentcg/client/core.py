"""What the blocking and the asyncio client share: results, errors, the
trampolines, and the reconnect policy (how long and how often a request is
sent again while agentcgd restarts, and what a resent request means).

The policy is free of I/O: `Attempts` says how long to wait before the next
try and what the request's fields are on a resend; each client only does the
connecting, the sending and the sleeping (time.sleep or asyncio.sleep).

Resending is safe for every request: `call.start` carries a token that the
daemon recognises (the same call, never a second one), `call.end` and
`call.started` are idempotent, a resent `session.create` accepts the session
the lost attempt made, and a resent `session.end` that finds the session gone
reports it ended.
"""
from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from agentcg import protocol as p

RECONNECT_ENV = "AGENTCG_RECONNECT_TIMEOUT_S"
DEFAULT_RECONNECT_TIMEOUT_S = 30.0
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 1.0

# waits for a line on fd N, then closes it and execs the command (sh takes fds 0-9 only)
SH_TRAMPOLINE = 'read -r _ <&{fd} || exit 125; exec {fd}<&-; exec "$@"'
PY_TRAMPOLINE = ("import os,sys; fd=int(sys.argv[1]); b=os.read(fd,3); os.close(fd); "
                 "b or sys.exit(125); os.execvp(sys.argv[2], sys.argv[2:])")


class DaemonUnavailable(ConnectionError):
    """agentcgd is not running or its socket cannot be reached. `refused`:
    its socket is there but nothing listens (a daemon that died, and is
    restarted by systemd), as opposed to no socket at all (not running)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    return DaemonUnavailable(f"cannot reach agentcgd at {path}: {exc.strerror or exc}",
                             refused=isinstance(exc, ConnectionRefusedError))


def give_up_at_once(reached: bool, wait_for_daemon: bool, exc: BaseException) -> bool:
    """Whether a failed first connection is final: the daemon was never
    reached and either the caller does not wait for it or there is no socket
    at all (no daemon, or one stopped cleanly)."""
    if reached:
        return False
    return not (wait_for_daemon and getattr(exc, "refused", False))


# what a lost daemon looks like to a request (refused, reset, closed mid-reply)
CONNECTION_LOST = (DaemonUnavailable, ConnectionError, EOFError)


def default_socket_path() -> str:
    return os.environ.get("AGENTCG_SOCKET") or p.DEFAULT_SOCKET


def exit_status(returncode: int) -> int:
    """subprocess returncode -> shell-style status (killed by signal n -> 128+n)."""
    return 128 - returncode if returncode < 0 else returncode


def reconnect_timeout_s(value: float | None = None) -> float:
    """The reconnect bound: `value`, else $AGENTCG_RECONNECT_TIMEOUT_S, else 30 s."""
    if value is None:
        text = os.environ.get(RECONNECT_ENV)
        if not text:
            return DEFAULT_RECONNECT_TIMEOUT_S
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{RECONNECT_ENV}: {text!r} is not a number of seconds") from None
    if not value >= 0:   # also refuses NaN
        raise ValueError(f"reconnect timeout: {value!r} is not a number of seconds >= 0")
    return float(value)


def call_token() -> str:
    """Names one call.start for the daemon, so that a resend finds the same call."""
    return uuid.uuid4().hex


def intent_field(intent: Any) -> Any:
    if intent is None or isinstance(intent, (str, dict)):
        return intent
    to_dict = getattr(intent, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    raise TypeError(f"intent: {intent!r} is not a string, a dict or an Intent")


@dataclass
class CallResult:
    exit_status: int
    returncode: int
    session: str
    call: int
    stats: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    stdout: Any = None
    stderr: Any = None
    reply: dict[str, Any] = field(default_factory=dict)
    error: str | None = None       # the command could not be executed (exit status 127)
    # why the daemon could not account the call (not reached within the reconnect
    # bound, or it lost the call); exit_status is the command's all the same
    unaccounted: str | None = None

    def feedback_text(self) -> str:
        return "\n".join(f"agentcg: {f['message']} {f.get('suggestion', '')}".rstrip() for f in self.feedback)


class Attempts:
    """The tries of one request: exponential backoff with jitter from
    FIRST_DELAY_S up to MAX_DELAY_S between tries, none starting after
    `timeout_s` (counted from the first failure)."""

    def __init__(self, op: str, fields: dict[str, Any], timeout_s: float, *,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random):
        self.op = op
        self.fields = dict(fields)
        self.timeout_s = timeout_s
        self.clock = clock
        self.rng = rng
        self.deadline: float | None = None
        self.delay_s = FIRST_DELAY_S
        self.resent = False
        self.tries = 1

    def next_delay(self, exc: BaseException) -> float:
        """Seconds to sleep before the next try after `exc`; raises
        DaemonUnavailable once the bound is spent."""
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + self.timeout_s
        left = self.deadline - now
        if left <= 0:
            if isinstance(exc, DaemonUnavailable):
                raise exc
            raise DaemonUnavailable(f"lost the connection to agentcgd: {exc}") from None
        delay = min(self.delay_s * (0.5 + self.rng()), left)   # jitter: restarted daemons see no herd
        self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        self.tries += 1
        self._resend()
        return delay

    def _resend(self) -> None:
        self.resent = True
        if self.op == "session.create":
            self.fields["exist_ok"] = True     # the lost try may have made it

    def after_error(self, exc: p.ProtocolError) -> dict[str, Any]:
        """The reply to return for an error reply, or raise it."""
        if self.resent and self.op == "session.end" and exc.code == p.E_NOT_FOUND:
            return {"session": self.fields.get("name"), "ended_before_reconnect": True}
        raise exc
