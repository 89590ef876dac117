"""agentcg session: create, attach, list, show and end sessions."""
from __future__ import annotations

from typing import Any

import click

from agentcg.client import Client, ProtocolError

from . import output as out
from .common import Api, fail, intent_summary, json_option, scalar, strip_envelope, time_ns
from .hints import HintError, check_session_name, parse_intent


@click.group()
def session() -> None:
    """Create, list, show and end sessions (one per agent).

    \b
    Examples:
      agentcg session create agent-1 --intent memory=8G,cpu=latency
      agentcg session create agent-2 --attach 4242    # automatic mode
      agentcg session attach agent-2 4243
      agentcg session list
      agentcg session show agent-1
      agentcg session end agent-1
    """


@session.command("create")
@click.argument("name")
@click.option("--intent", "intent_text", metavar="K=V,...",
              help="Session budget, e.g. memory=8G,memory_max=16G,priority=7 (see docs/intents.md).")
@click.option("--uid", type=int, help="Owner uid (root only; default: yours).")
@click.option("--exist-ok", is_flag=True, help="Succeed if a session of that name exists already.")
@click.option("--attach", "attach_pids", metavar="PID", type=int, multiple=True,
              help="Attach this running agent process (repeatable): automatic mode, see above.")
@json_option
@click.pass_context
def session_create(ctx, name, intent_text, uid, exist_ok, attach_pids, as_json) -> None:
    """Create session NAME; it lives until `agentcg session end NAME`.

    \b
    Automatic mode, for agents that cannot be changed: --attach PID moves the
    running agent into the session's agent cgroup, and every process it
    starts from then on becomes a tool call of its own at its first exec
    (followed in the kernel by the eBPF tracker), with the intent of the
    first matching [[auto_rules]] entry of the config or the session's
    default. The PID must be a process of yours (any for root). Processes
    started before the attach stay where they are. `agentcg status` says
    whether the tracker runs (hooks.bpf); without it the agent is only
    accounted as a whole. At `session end` it is moved back where it was.

    \b
    Examples:
      agentcg session create agent-1 --intent memory=8G,priority=7
      agentcg session create agent-2 --intent memory_max=8G --attach "$AGENT_PID"
    """
    try:
        check_session_name(name)
        intent = parse_intent(intent_text)
        for pid in attach_pids:
            check_pid_option(pid, "--attach")
    except HintError as exc:
        fail(str(exc), 2)
    with Api(ctx) as client:
        s = client.session(name, intent=intent.to_dict() or None, uid=uid, exist_ok=exist_ok, end_on_exit=False)
        try:
            attached = [attach_pid(client, s, pid) for pid in attach_pids]
        except ProtocolError:
            if not exist_ok:   # made just now, for an agent that cannot be attached: of no use
                s.end()
            raise
    if as_json:
        click.echo(out.to_json({**s.info, **({"attached": attached} if attached else {})}))
    else:
        click.echo(f"session {name} created ({s.info.get('cgroup', '')})".replace(" ()", ""))
        for a in attached:
            click.echo(f"pid {a['pid']} attached ({a['cgroup']})")


@session.command("attach")
@click.argument("name")
@click.argument("pids", metavar="PID...", type=int, nargs=-1, required=True)
@json_option
@click.pass_context
def session_attach(ctx, name, pids, as_json) -> None:
    """Attach running agent processes PID... to session NAME (automatic mode).

    \b
    Each PID is moved into the session's agent cgroup; every process it
    starts from then on becomes a tool call of its own at its first exec
    (eBPF tracker), with the intent of the first matching [[auto_rules]]
    entry of the config or the session's default. PIDs must be processes of
    yours (any for root); at `session end` they are moved back.

    \b
    Example:
      agentcg session attach agent-2 "$AGENT_PID"
    """
    try:
        for pid in pids:
            check_pid_option(pid, "PID")
    except HintError as exc:
        fail(str(exc), 2)
    with Api(ctx) as client:
        s = client.get_session(name)
        attached = [attach_pid(client, s, pid) for pid in pids]
    if as_json:
        click.echo(out.to_json(attached))
    else:
        for a in attached:
            click.echo(f"pid {a['pid']} attached to session {name} ({a['cgroup']})")


def check_pid_option(pid: int, field: str) -> None:
    if pid <= 0:
        raise HintError(field, pid, "is not a process id")


def attach_pid(client: Client, s, pid: int) -> dict[str, Any]:
    """session.attach of one pid: {"pid", "cgroup"}."""
    reply = s.attach(pid)
    return {"pid": pid, "cgroup": reply.get("cgroup")}


@session.command("list")
@json_option
@click.pass_context
def session_list(ctx, as_json) -> None:
    """List sessions you may see (all of them for root).

    CALLS is running/finished tool calls; MEM.MAX the session's hard cap.
    """
    with Api(ctx) as client:
        sessions = client.sessions()
    if as_json:
        click.echo(out.to_json(sessions))
        return
    if not sessions:
        click.echo("no sessions")
        return
    rows = []
    for s in sessions:
        limits = s.get("limits") or {}
        rows.append([s.get("name"), s.get("uid"), calls_text(s), out.size(limits.get("memory_max_bytes")),
                     s.get("intent_text") or intent_summary(s), out.age(time_ns(s.get("created_time")))])
    click.echo(out.table(["NAME", "UID", "CALLS", "MEM.MAX", "INTENT", "CREATED"], rows))


def calls_text(s: dict) -> str:
    """'running/done'."""
    running, done = s.get("running_calls"), s.get("calls_done")
    if running is None and done is None:
        return "-"
    return f"{running or 0}/{done or 0}"


@session.command("show")
@click.argument("name")
@json_option
@click.pass_context
def session_show(ctx, name, as_json) -> None:
    """Show session NAME: its budget, usage and tool calls."""
    with Api(ctx) as client:
        info = client.show(name)
    if as_json:
        click.echo(out.to_json(info))
        return
    calls = None
    for key in ("running", "calls", "recent"):
        if isinstance(info.get(key), list) and info[key] and isinstance(info[key][0], dict):
            calls = calls or []
            calls.extend(info[key])
    for key, value in info.items():
        if isinstance(value, list) and (not value or isinstance(value[0], dict)):
            continue
        if key == "intent":
            value = intent_summary(info)
        elif key == "created_time":
            key, value = "created", f"{out.clock(time_ns(value))} ({out.age(time_ns(value))})"
        click.echo(f"{key}: {scalar(key, value)}")
    if calls:
        click.echo("")
        rows = []
        for c in calls:
            stats = c.get("stats") or {}
            rows.append([c.get("call", c.get("number")), c.get("name") or "-", c.get("state", "-"),
                         c.get("pid"), c.get("exit_status"), out.duration_ns(stats.get("wall_ns")),
                         out.size(stats.get("memory_peak_bytes"))])
        click.echo(out.table(["CALL", "NAME", "STATE", "PID", "EXIT", "WALL", "MEM.PEAK"], rows))


@session.command("end")
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill tool calls still running in the session.")
@json_option
@click.pass_context
def session_end(ctx, name, force, as_json) -> None:
    """End session NAME and remove its cgroups."""
    with Api(ctx) as client:
        reply = strip_envelope(client.request("session.end", name=name, force=force))
    if as_json:
        click.echo(out.to_json(reply))
    else:
        click.echo(f"session {name} ended")
