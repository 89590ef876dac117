"""agentcg events: the daemon's event log, and its stream with --follow."""
from __future__ import annotations

import sys

import click

from . import output as out
from .common import Api, json_option, time_ns

@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they happen (Ctrl-C stops).")
@click.option("--session", "session_name", metavar="NAME", help="Only this session's events.")
@click.option("--new", "only_new", is_flag=True, help="Skip the history; only events from now on (with --follow).")
@json_option
@click.pass_context
def events(ctx, follow, session_name, only_new, as_json) -> None:
    """Print the event log: sessions, tool calls and what the kernel did.

    \b
    Examples:
      agentcg events
      agentcg events --follow --session agent-1
      agentcg events --json | jq 'select(.kind == "call.end")'
    """
    with Api(ctx) as client:
        try:
            for ev in client.events(follow=follow, session=session_name, history=not only_new):
                if as_json:
                    click.echo(out.to_json(ev))
                else:
                    click.echo(format_event(ev))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


def format_event(ev: dict) -> str:
    kind = ev.get("kind") or ev.get("type") or ev.get("event") or "?"
    where = ev.get("session") or "-"
    if ev.get("call") is not None:
        where += f"/c-{ev['call']}"
    parts = [out.clock(time_ns(ev.get("time"))), f"{kind:<14}", where]
    if ev.get("name"):
        parts.append(str(ev["name"]))
    stats = ev.get("stats") or {}
    if "exit_status" in ev:
        parts.append(f"exit={ev['exit_status']}")
    if stats.get("wall_ns") is not None:
        parts.append(f"wall={out.duration_ns(stats['wall_ns'])}")
    if stats.get("memory_peak_bytes") is not None:
        parts.append(f"peak={out.size(stats['memory_peak_bytes'])}")
    reason = ev.get("reason")
    if isinstance(reason, dict):
        reason = ": ".join(str(reason[k]) for k in ("rule", "measured") if reason.get(k))
    if reason:
        parts.append(f"({reason})")
    line = "  ".join(parts)
    for fb in out.feedback_lines(ev.get("feedback")):
        line += f"\n    {fb}"
    return line
