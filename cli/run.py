"""agentcg run: one command as one tool call, its exit status passed through."""
from __future__ import annotations

import os
import signal
import sys

import click

from agentcg.client import Client, DaemonUnavailable, ProtocolError
from agentcg.client.core import RECONNECT_ENV

from . import output as out
from .common import fail, json_option, not_running_message, socket_path
from .hints import HintError, call_name_for, check_call_name, check_session_name, parse_intent, split_session_intent

EXIT_AGENTCG_FAILED = 125   # like env(1)/timeout(1): the command itself did not run
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
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
