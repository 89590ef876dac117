"""systemd service notification (sd_notify) with the standard library only.

Under ``Type=notify`` systemd passes the path of a datagram socket in
``$NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` lines to
it: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least once per ``WatchdogSec`` and ``STOPPING=1`` when it
begins a clean stop. A path starting with ``@`` names a socket in the abstract
namespace (the ``@`` stands for a leading NUL byte).

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a cheap no-op that
returns False, so the daemon calls these functions unconditionally.

    from agentcg.daemon import notify
    notify.ready("serving on /run/agentcg/agentcg.sock")
    interval_s = notify.watchdog_interval_s()   # None: no watchdog wanted
    ...  # every interval_s / 2: notify.watchdog()
    notify.stopping()
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = [
    "NotifyError", "notify", "ready", "status", "watchdog", "stopping",
    "watchdog_interval_s", "notify_socket_address",
]


class NotifyError(ValueError):
    """A notification that cannot be encoded (bad field name or value)."""


def notify_socket_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to, from ``$NOTIFY_SOCKET``; None when unset or unusable.

    A filesystem path is returned as ``str``; an abstract address (``@name``)
    as ``bytes`` starting with a NUL byte, as ``socket.sendto`` expects it.
    Other transports systemd may offer (``vsock:``) are not supported here.
    """
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def _encode(fields: Mapping[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        name = key.upper()
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise NotifyError(f"notify field name {key!r} is not a valid KEY (letters, digits, _)")
        if value is True:
            text = "1"
        elif value is False or value is None:
            continue
        else:
            text = str(value)
        if "\n" in text:
            raise NotifyError(f"notify field {name} must be one line, got {text!r}")
        lines.append(f"{name}={text}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def notify(*, environ: Mapping[str, str] | None = None, **fields: object) -> bool:
    """Send ``KEY=VALUE`` lines to systemd. ``notify(READY=1, STATUS="serving")``.

    Field names are upper-cased; ``True`` is sent as ``1``; ``False``/``None``
    fields are left out. Returns True when a datagram was sent, False when
    there is no notification socket (not under systemd). An unreachable socket
    (systemd gone) is also reported as False rather than raised: a lost status
    line must never take the daemon down.
    """
    addr = notify_socket_address(environ)
    payload = _encode(fields)
    if addr is None or not payload:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(payload, addr)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def ready(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1 (plus STATUS= when given): the daemon serves requests now."""
    return notify(environ=environ, READY=1, STATUS=status_text)


def status(status_text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: one line shown by ``systemctl status agentcgd``."""
    return notify(environ=environ, STATUS=status_text)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: the event loop is alive. Send every watchdog_interval_s() / 2."""
    return notify(environ=environ, WATCHDOG=1)


def stopping(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: a clean stop has begun."""
    return notify(environ=environ, STOPPING=1, STATUS=status_text)


def watchdog_interval_s(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds, or None.

    Read from ``$WATCHDOG_USEC``; when ``$WATCHDOG_PID`` is set it must name
    this process (``pid``, default ``os.getpid()``), otherwise the watchdog is
    meant for another process and None is returned. Ping at half this interval.
    Malformed values count as "no watchdog" (systemd never sends those).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            wd_pid = int(pid_text)
        except ValueError:
            return None
        if wd_pid != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000
