"""agentcg: the command line for agentcgd (a thin layer over agentcg.client).

    agentcg status
    agentcg session create agent-1 --intent memory=8G,priority=7
    agentcg run --session agent-1 --intent memory=2G,cpu=batch -- pytest -q
    agentcg events --follow --session agent-1
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

import click

from agentcg import protocol as p
from agentcg.client import Client, DaemonUnavailable, ProtocolError
from agentcg.client.core import RECONNECT_ENV

from . import output as out
from .hints import HintError, call_name_for, check_call_name, check_session_name, parse_intent, split_session_intent

EXIT_AGENTCG_FAILED = 125   # like env(1)/timeout(1): the command itself did not run
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


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


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_", metavar="PATH", envvar="AGENTCG_SOCKET",
              help=f"agentcgd's socket (env AGENTCG_SOCKET; default {p.DEFAULT_SOCKET}).")
@click.pass_context
def cli(ctx: click.Context, socket_: str | None) -> None:
    """Run AI agents' tool calls in their own cgroups, under agentcgd.

    \b
    Every tool call gets a fresh cgroup below its session's, with the limits
    its intent asks for (within the session's budget); when the kernel steps
    in (throttling, OOM kill, killed stragglers) you are told in plain words.

    \b
    Examples:
      agentcg status
      agentcg session create agent-1 --intent memory=8G
      agentcg run --session agent-1 --intent memory=2G,cpu=batch -- pytest -q
      agentcg events --follow
    """
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket_


# --- status ---------------------------------------------------------------

@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon: root cgroup, sessions, running calls, extensions.

    \b
    Example:
      agentcg status --json
    """
    with Api(ctx) as client:
        st = client.status()
    st.pop("v", None), st.pop("id", None), st.pop("ok", None)
    if as_json:
        click.echo(out.to_json(st))
        return
    for line in _tree_lines(st):
        click.echo(line)


def _tree_lines(data: dict, indent: str = "") -> list[str]:
    """Nested dicts as an indented outline; lists of scalars on one line;
    lists of records one per line (their own "line" text where they carry
    one, as the policy's last actions do)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.extend(_tree_lines(value, indent + "  "))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            lines.extend(f"{indent}  - {v['line'] if isinstance(v.get('line'), str) else _scalar(key, v)}"
                         for v in value)
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: {', '.join(_scalar(key, v) for v in value) or '-'}")
        else:
            lines.append(f"{indent}{key}: {_scalar(key, value)}")
    return lines


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_scalar(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, int) and not isinstance(value, bool):
        if key.endswith("_bytes"):
            return out.size(value)
        if key.endswith("_ns"):
            return out.duration_ns(value)
    return "-" if value is None else str(value)


# --- sessions -------------------------------------------------------------

@cli.group()
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
        rows.append([s.get("name"), s.get("uid"), _calls(s), out.size(limits.get("memory_max_bytes")), s.get("intent_text") or _intent_text(s),
                     out.age(_time_ns(s.get("created_time")))])
    click.echo(out.table(["NAME", "UID", "CALLS", "MEM.MAX", "INTENT", "CREATED"], rows))


def _calls(s: dict) -> str:
    """'running/done'."""
    running, done = s.get("running_calls"), s.get("calls_done")
    if running is None and done is None:
        return "-"
    return f"{running or 0}/{done or 0}"


def _time_ns(seconds: Any) -> int | None:
    return int(seconds * 1e9) if isinstance(seconds, (int, float)) else None


def _intent_text(s: dict) -> str:
    intent = s.get("intent") or {}
    parts = []
    for k, v in intent.items():
        if k in ("memory", "memory_max", "gpu_memory") and isinstance(v, int):
            v = out.size(v)
        parts.append(f"{k}={v}")
    return ",".join(parts) or "-"


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
            value = _intent_text(info)
        elif key == "created_time":
            key, value = "created", f"{out.clock(_time_ns(value))} ({out.age(_time_ns(value))})"
        click.echo(f"{key}: {_scalar(key, value)}")
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
        reply = client.request("session.end", name=name, force=force)
    for k in ("v", "id", "ok"):
        reply.pop(k, None)
    if as_json:
        click.echo(out.to_json(reply))
    else:
        click.echo(f"session {name} ended")


# --- run ------------------------------------------------------------------

@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--session", "session_name", metavar="NAME", envvar="AGENTCG_SESSION",
              help="Session to run in (env AGENTCG_SESSION). Default: a throw-away session "
                   "run-<pid>, created for this command and ended after it.")
@click.option("--intent", "intent_text", metavar="K=V,...",
              help="The call's intent, e.g. memory=2G,cpu=latency,pids_max=512.")
@click.option("--name", "call_name", metavar="NAME", help="Tool-call name in events (default: the program's name).")
@click.option("--reconnect-timeout", "reconnect_timeout_s", metavar="SECONDS", type=click.FloatRange(min=0),
              envvar=RECONNECT_ENV, show_envvar=True,
              help="How long to wait for agentcgd while it restarts, before the call and after it "
                   "(default 30). The command's exit status passes through either way.")
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, session_name, intent_text, call_name, reconnect_timeout_s, as_json, command) -> None:
    """Run COMMAND as one tool call and pass its exit status through.

    \b
    The command starts inside a fresh tool-call cgroup (placed before it runs
    an instruction), with stdin/stdout/stderr inherited. When the kernel
    intervened, the feedback is printed on stderr ("agentcg: ..."); with
    --json a one-line JSON result (exit status, stats, feedback) is printed
    on stderr instead, so the command's stdout stays untouched.

    \b
    Exit status: the command's; 128+N when killed by signal N (137 after an
    OOM kill); 125 when agentcg could not start it, 126/127 when it is not
    executable / not found.

    \b
    A daemon restart is invisible: agentcg waits for agentcgd to come back
    (up to --reconnect-timeout) and the call is accounted; if it does not
    come back in time, the command's own exit status is returned all the
    same, with a warning that the call could not be accounted.

    \b
    Examples:
      agentcg run -- make -j4
      agentcg run --session agent-1 --intent memory=2G,cpu=batch -- pytest -q tests/
      agentcg run --intent memory_max=512M --name probe -- sh -c 'exit 3'; echo $?
    """
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        fail("no command given (usage: agentcg run [OPTIONS] -- COMMAND...)", 2)
    try:
        intent = parse_intent(intent_text)
        name = check_call_name(call_name, field="--name") if call_name else call_name_for(argv)
        if session_name:
            check_session_name(session_name, field="--session")
    except HintError as exc:
        fail(str(exc), 2)
    status_code = run_tool_call(socket_path(ctx), argv, session_name=session_name, intent=intent,
                                name=name, as_json=as_json, prog="agentcg",
                                reconnect_timeout_s=reconnect_timeout_s)
    sys.exit(status_code)


def run_tool_call(path: str, argv: list[str], *, session_name: str | None, intent, name: str,
                  as_json: bool, prog: str, on_unavailable=None, reconnect_timeout_s: float | None = None,
                  wait_for_daemon: bool = True) -> int:
    """Run argv as one tool call; returns the exit status to exit with.

    The daemon is waited for (up to reconnect_timeout_s, default
    $AGENTCG_RECONNECT_TIMEOUT_S or 30 s) when it restarts, and with
    wait_for_daemon also when it is not up yet. on_unavailable(exc) is
    called instead of failing when the daemon cannot be reached before the
    command started (the hint wrapper runs it plainly)."""
    try:
        client = Client(socket_path=path, timeout_s=60.0, reconnect_timeout_s=reconnect_timeout_s,
                        wait_for_daemon=wait_for_daemon)
    except ValueError as exc:    # a bad $AGENTCG_RECONNECT_TIMEOUT_S
        click.echo(f"{prog}: error: {exc}; the command was not run", err=True)
        return EXIT_AGENTCG_FAILED
    session_intent, call_intent = split_session_intent(intent)
    adhoc = session_name is None
    sname = session_name or f"run-{os.getpid()}"
    started = False
    try:
        if adhoc:
            sess = client.session(sname, intent=session_intent.to_dict() or None, end_on_exit=True)
        else:
            sess = client.get_session(sname)
        try:
            handle = sess.tool_call(name, intent=call_intent.to_dict() or None).popen(argv)
            started = True
            result = _wait_forwarding_signals(handle)
        finally:
            if adhoc:
                try:
                    sess.end(force=True)
                except (DaemonUnavailable, ProtocolError):
                    pass
    except FileNotFoundError as exc:
        if started:
            raise
        click.echo(f"{prog}: {argv[0]}: command not found", err=True)
        return EXIT_NOT_FOUND
    except DaemonUnavailable as exc:
        if started:
            # the command ran; only its accounting is lost
            click.echo(f"{prog}: warning: lost agentcgd after the command started ({exc})", err=True)
            return EXIT_AGENTCG_FAILED
        if on_unavailable is not None:
            return on_unavailable(exc)
        click.echo(f"{prog}: error: {not_running_message(path)} ({exc})", err=True)
        return EXIT_AGENTCG_FAILED
    except ProtocolError as exc:
        click.echo(f"{prog}: error: {exc.message} [{exc.code}]; the command was not run", err=True)
        return EXIT_AGENTCG_FAILED
    finally:
        client.close()
    if as_json:
        click.echo(out.to_json({"exit_status": result.exit_status, "session": result.session,
                                "call": result.call, "name": name, "stats": result.stats,
                                "limits": result.limits, "feedback": result.feedback,
                                **({"unaccounted": result.unaccounted} if result.unaccounted else {})}),
                   err=True)
    else:
        for line in out.feedback_lines(result.feedback):
            click.echo(f"{prog}: {line}", err=True)
    if result.unaccounted:
        click.echo(f"{prog}: warning: {result.unaccounted}", err=True)
    return result.exit_status


def _wait_forwarding_signals(handle):
    """Wait for the call; SIGINT/SIGTERM/SIGHUP sent to us are passed to the command."""
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {}

    def forward(signum, _frame):
        try:
            handle.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in forwarded:
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        return handle.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- events ---------------------------------------------------------------

@cli.command()
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
    parts = [out.clock(_time_ns(ev.get("time"))), f"{kind:<14}", where]
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


from .integrate import integrate as _integrate, mcp_cmd as _mcp_cmd   # noqa: E402  (after cli exists)

cli.add_command(_integrate)
cli.add_command(_mcp_cmd)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="agentcg")


if __name__ == "__main__":
    main()
