"""agentcg-exec: a drop-in shell for agents that only ever run `bash -c ...`.

Point the agent's shell at it (SHELL=/usr/local/bin/agentcg-exec, or the
agent framework's "shell" setting); every `agentcg-exec -c "pytest -q"` then
runs `bash -c "pytest -q"` as one tool call:

    AGENTCG_SESSION=agent-1 \\
    AGENT_RESOURCE_HINT=memory=2G,cpu=batch,name=tests \\
        agentcg-exec -c "pytest -q"

- AGENT_RESOURCE_HINT: the call's intent (any intent field, see
  docs/intents.md) plus name= for the call's name (default: the first word of
  the command). A bad hint is refused with a message naming the field, and
  the command is not run (exit 2): an agent that declares an intent wants it.
- AGENTCG_SESSION: the session to run in. Unset: a throw-away session
  run-<pid>, ended after the command (as `agentcg run` does).
- AGENTCG_SOCKET: the daemon's socket (default /run/agentcg/agentcg.sock).
- AGENTCG_EXEC_SHELL: the real shell (default /bin/bash).
- AGENTCG_RECONNECT_TIMEOUT_S: how long to wait for a restarting agentcgd
  (default 30 s), before the command starts and after it ends.

The exit status of the command passes through; feedback from the kernel's
interventions goes to stderr as "agentcg: ..." lines the agent reads.

A daemon restart is invisible: a call that runs while agentcgd restarts is
accounted once it is back, and a command started while it restarts (its
socket refuses) waits for it. If it does not come back within the bound,
the command's own exit status is returned all the same, with a warning on
stderr that the call could not be accounted.

Never losing the agent's command: when agentcgd cannot be reached, the
command runs plainly (exec of the real shell, no cgroup, no limits), with a
warning on stderr once per outage (a marker file in $XDG_RUNTIME_DIR or
/tmp remembers that it warned; it is removed as soon as the daemon answers
again). A daemon that answers but refuses the call (e.g. an unknown
session) is an error (exit 125): running it unaccounted would hide the
problem.

Invoked without -c (an interactive shell, a script file), agentcg-exec
execs the real shell unchanged.
"""
from __future__ import annotations

import os
import sys
import tempfile


from agentcg import protocol as p

from .hints import HINT_ENV, SESSION_ENV, HintError, call_name_for, check_session_name, parse_hint
from .run import run_tool_call

SHELL_ENV = "AGENTCG_EXEC_SHELL"
EXIT_BAD_HINT = 2


def real_shell() -> str:
    return os.environ.get(SHELL_ENV) or "/bin/bash"


def warn_marker() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"agentcg-exec-{os.getuid()}.unreachable")


def has_command_string(args: list[str]) -> bool:
    """True for `-c CMD`, `-lc CMD`, `-e -c CMD` ...: options up to a -c."""
    for a in args:
        if a == "--" or not a.startswith("-") or a == "-":
            return False
        if a.startswith("--"):
            continue
        if "c" in a[1:]:
            return True
    return False


def command_text(args: list[str]) -> str:
    """The CMD of a `... -c CMD ...` argument list (for the call's name)."""
    for i, a in enumerate(args):
        if a.startswith("-") and not a.startswith("--") and "c" in a[1:]:
            return args[i + 1] if i + 1 < len(args) else ""
    return ""


def _exec_plain(shell: str, args: list[str]) -> int:
    try:
        os.execv(shell, [shell, *args])
    except OSError as exc:
        print(f"agentcg-exec: cannot run {shell}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    shell = real_shell()
    if not has_command_string(args):
        return _exec_plain(shell, args)

    try:
        hint = parse_hint(os.environ.get(HINT_ENV))
        session = os.environ.get(SESSION_ENV) or None
        if session is not None:
            check_session_name(session, field=SESSION_ENV)
    except HintError as exc:
        print(f"agentcg-exec: {exc}; the command was not run", file=sys.stderr)
        return EXIT_BAD_HINT

    cmd_words = command_text(args).split()
    name = hint.name or call_name_for(cmd_words or ["call"])
    path = os.environ.get("AGENTCG_SOCKET") or p.DEFAULT_SOCKET
    marker = warn_marker()

    def unavailable(exc: Exception) -> int:
        if not os.path.exists(marker):
            print(f"agentcg-exec: warning: agentcgd is not reachable at {path} ({exc}); running "
                  f"commands without resource control until it is back", file=sys.stderr)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError:
                pass
        return _exec_plain(shell, args)

    # an outage already warned about: run at once instead of waiting for the daemon again
    status = run_tool_call(path, [shell, *args], session_name=session, intent=hint.intent, name=name,
                           as_json=False, prog="agentcg", on_unavailable=unavailable,
                           wait_for_daemon=not os.path.exists(marker))
    try:
        os.unlink(marker)  # reached the daemon: warn again at the next outage
    except OSError:
        pass
    return status


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
