"""What every command shares: the socket path, the client wrapped in the CLI's
error handling, the --json option, and small formatting helpers."""
from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from agentcg import protocol as p
from agentcg.client import Client, DaemonUnavailable, ProtocolError

from . import output as out


def socket_path(ctx: click.Context) -> str:
    return ctx.obj.get("socket") or os.environ.get("AGENTCG_SOCKET") or p.DEFAULT_SOCKET


def not_running_message(path: str) -> str:
    return (f"agentcgd is not running at {path}: start it with "
            f"`systemctl start agentcgd` or `sudo agentcgd`")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"agentcg: error: {message}", err=True)
    sys.exit(code)


class Api:
    """The client plus the CLI's error handling: every failure becomes one line."""

    def __init__(self, ctx: click.Context, *, failure_code: int = 1):
        self.path = socket_path(ctx)
        self.client = Client(socket_path=self.path)
        self.failure_code = failure_code

    def __enter__(self) -> Client:
        return self.client

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.client.close()
        if exc is None:
            return False
        if isinstance(exc, DaemonUnavailable):
            fail(not_running_message(self.path) + f" ({exc})", self.failure_code)
        if isinstance(exc, ProtocolError):
            fail(f"{exc.message} [{exc.code}]", self.failure_code)
        if isinstance(exc, PermissionError):
            fail(f"permission denied on {self.path}: {exc}", self.failure_code)
        return False


def _json_wanted(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """A command's --json, or the one given before the command
    (`agentcg --json status`), which the root group keeps in its params."""
    return bool(value or ctx.find_root().params.get("as_json"))


JSON_HELP = "Print machine-readable JSON instead of text (also accepted before the command)."
json_option = click.option("--json", "as_json", is_flag=True, callback=_json_wanted, help=JSON_HELP)


def strip_envelope(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply without the protocol's own fields (v, id, ok)."""
    for k in ("v", "id", "ok"):
        reply.pop(k, None)
    return reply


def time_ns(seconds: Any) -> int | None:
    return int(seconds * 1e9) if isinstance(seconds, (int, float)) else None


def scalar(key: str, value: Any) -> str:
    """One value as text, by its key's unit suffix (_bytes, _ns)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={scalar(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, int) and not isinstance(value, bool):
        if key.endswith("_bytes"):
            return out.size(value)
        if key.endswith("_ns"):
            return out.duration_ns(value)
    return "-" if value is None else str(value)


def intent_summary(s: dict) -> str:
    intent = s.get("intent") or {}
    parts = []
    for k, v in intent.items():
        if k in ("memory", "memory_max", "gpu_memory") and isinstance(v, int):
            v = out.size(v)
        parts.append(f"{k}={v}")
    return ",".join(parts) or "-"
