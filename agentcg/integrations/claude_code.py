"""Claude Code command hooks: every Bash tool call becomes an agentcg tool call.

Claude Code runs a command hook with the event as one JSON object on stdin
and reads its answer (JSON) from stdout (Hooks reference,
https://code.claude.com/docs/en/hooks). One entry point serves both events:

    python -m agentcg.integrations.claude_code [--config PATH] [--intent K=V,...]

- PreToolUse (tool_name "Bash"): the session `cc-<session_id>` is made if it
  does not exist yet, and the command is rewritten, through
  `hookSpecificOutput.updatedInput` (which replaces the whole tool input, so
  every other field is copied), into

      agentcg run --session cc-<id> --name <prog>-<tool_use_id tail> --intent <rule's> -- bash -c '<command>'

  The intent is the first matching [[auto_rules]] entry of agentcgd's config
  (`command` glob on the program, `regex` on the line), with --intent under
  it. `permissionDecision` is "ask" (the user approves the wrapped command, as
  before the hook) unless --decision allow, or Claude Code runs with
  bypassPermissions. When agentcgd cannot be reached the command is left
  alone and the model told so (`additionalContext`): no work is lost.
- PostToolUse: the call's result is looked up in the session (by the call's
  name) and the kernel's interventions (OOM kills, throttling, pids.max,
  stragglers) with the memory peak against the call's limits go back to the
  model as `hookSpecificOutput.additionalContext`; with --report always,
  the numbers of every call, also when nothing happened.

`agentcg integrate claude-code` writes this hook into .claude/settings.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from agentcg.client import Client, DaemonUnavailable, ProtocolError

from ._common import (DEFAULT_SHELL, command_words, ensure_session, intent_text, load_rules, report_lines,
                      rule_for_command, safe_name)

HOOK_MODULE = "agentcg.integrations.claude_code"
SESSION_PREFIX = "cc-"
DECISIONS = ("ask", "allow")
HOOK_TIMEOUT_S = 30


def agentcg_command() -> list[str]:
    """How to start the `agentcg` CLI of this installation (its script beside
    this interpreter, else the module)."""
    exe = Path(sys.executable).parent / "agentcg"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agentcg.cli.main"]


def session_for(payload: Mapping[str, Any]) -> str:
    return safe_name(str(payload.get("session_id") or ""), SESSION_PREFIX, fallback="session")


def call_name_for(payload: Mapping[str, Any], command: str) -> str:
    """'<program>-<tail of tool_use_id>': readable, and unique within the
    session so that PostToolUse finds this call's result."""
    words = command_words(command)
    prog = safe_name(os.path.basename(words[0]) if words else "", fallback="sh")[:40]
    tail = re.sub(r"[^A-Za-z0-9]", "", str(payload.get("tool_use_id") or ""))[-12:]
    return safe_name(f"{prog}-{tail}" if tail else prog, fallback="sh")


def is_wrapped(command: str) -> bool:
    """Already an `agentcg run` (a resent or a hand-written one)."""
    words = command_words(command)
    if len(words) >= 2 and os.path.basename(words[0]) == "agentcg":
        return "run" in words[1:4]
    return len(words) >= 4 and words[1:3] == ["-m", "agentcg.cli.main"]


def wrap(command: str, *, session: str, name: str, intent: str, socket: str | None = None,
         shell: str = DEFAULT_SHELL) -> str:
    """The command line that runs `command` as one tool call."""
    argv = agentcg_command()
    if socket:
        argv += ["--socket", socket]
    argv += ["run", "--session", session, "--name", name]
    if intent:
        argv += ["--intent", intent]
    argv += ["--", shell, "-c", command]
    return shlex.join(argv)


# --- the two events ---------------------------------------------------------------

def pre_tool_use(payload: Mapping[str, Any], opts: argparse.Namespace) -> dict[str, Any] | None:
    tool_input = payload.get("tool_input")
    if payload.get("tool_name") != "Bash" or not isinstance(tool_input, Mapping):
        return None
    command = tool_input.get("command")
    if not isinstance(command, str) or not command.strip() or is_wrapped(command):
        return None
    session = session_for(payload)
    try:
        rules = load_rules(opts.config)
    except ValueError as exc:   # a bad config: say so, and leave the command alone
        return _note(f"agentcg: the config's [[auto_rules]] could not be read ({exc}); "
                     "this command runs without agentcg's resource control.")
    rule_intent, rule = rule_for_command(rules, command)
    intent = intent_text(opts.intent, rule_intent)
    try:
        with Client(socket_path=opts.socket, timeout_s=10.0, reconnect_timeout_s=0) as client:
            ensure_session(client, session, opts.session_intent or None)
    except (DaemonUnavailable, OSError) as exc:
        return _note(f"agentcg: agentcgd is not reachable ({exc}); this command runs without "
                     "agentcg's resource control.")
    except ProtocolError as exc:
        return _note(f"agentcg: session {session} could not be made: {exc.message} [{exc.code}]; "
                     "this command runs without agentcg's resource control.")
    name = call_name_for(payload, command)
    decision = "allow" if opts.decision == "allow" or payload.get("permission_mode") == "bypassPermissions" else "ask"
    reason = f"agentcg: runs as tool call {name} of session {session}" + (f" with intent {intent}" if intent else "")
    if rule:
        reason += f" (auto rule {rule!r})"
    return {"hookSpecificOutput": {
        "hookEventName": "PreToolUse",
        "permissionDecision": decision,
        "permissionDecisionReason": reason,
        "updatedInput": {**tool_input, "command": wrap(command, session=session, name=name, intent=intent,
                                                         socket=opts.socket)},
    }}


def post_tool_use(payload: Mapping[str, Any], opts: argparse.Namespace) -> dict[str, Any] | None:
    tool_input = payload.get("tool_input")
    if payload.get("tool_name") != "Bash" or not isinstance(tool_input, Mapping):
        return None
    session = session_for(payload)
    original = _original_command(str(tool_input.get("command") or ""))
    name = call_name_for(payload, original)
    try:
        with Client(socket_path=opts.socket, timeout_s=10.0, reconnect_timeout_s=0) as client:
            recent = client.show(session).get("recent") or []
    except (DaemonUnavailable, ProtocolError, OSError):
        return None   # not run under agentcg (no daemon, no session): nothing to report
    result = next((r for r in reversed(recent) if r.get("name") == name), None)
    if result is None:
        return None
    lines = report_lines(result.get("stats") or {}, result.get("limits") or {}, result.get("feedback") or [],
                         call=result.get("call"), name=name, exit_status=result.get("exit_status"),
                         always=opts.report == "always")
    if not lines:
        return None
    return {"hookSpecificOutput": {"hookEventName": "PostToolUse", "additionalContext": "\n".join(lines)}}


def _original_command(command: str) -> str:
    """The agent's own command inside a wrapped one (PostToolUse may see
    either the input the model wrote or the one the hook rewrote)."""
    if not is_wrapped(command):
        return command
    words = command_words(command)
    if "--" in words:
        rest = words[words.index("--") + 1:]
        if len(rest) >= 3 and rest[1] == "-c":
            return rest[2]
    return command


def _note(text: str) -> dict[str, Any]:
    return {"hookSpecificOutput": {"hookEventName": "PreToolUse", "additionalContext": text}}


HANDLERS = {"PreToolUse": pre_tool_use, "PostToolUse": post_tool_use}


# --- the hook process -----------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"python -m {HOOK_MODULE}",
        description="Claude Code PreToolUse/PostToolUse hook: run each Bash tool call as an agentcg "
                    "tool call and report what the kernel did. Reads the hook's JSON on stdin.")
    ap.add_argument("--config", metavar="PATH",
                    help="agentcgd's config, for its [[auto_rules]] (default $AGENTCG_CONFIG or "
                         "/etc/agentcg/agentcg.toml).")
    ap.add_argument("--intent", metavar="K=V,...", default="",
                    help="Intent of every call, under the matching rule's (e.g. memory_max=8G).")
    ap.add_argument("--session-intent", metavar="K=V,...", default="",
                    help="Intent of the session made for a Claude Code session (e.g. memory_max=16G,priority=6).")
    ap.add_argument("--decision", choices=DECISIONS, default="ask",
                    help="permissionDecision for the rewritten command: ask (the user approves it; "
                         "default) or allow (approved by the hook; deny rules still apply).")
    ap.add_argument("--report", choices=("feedback", "always"), default="feedback",
                    help="PostToolUse: tell the model about calls the kernel intervened in (default), "
                         "or the numbers of every call.")
    ap.add_argument("--socket", metavar="PATH", help="agentcgd's socket (default $AGENTCG_SOCKET or "
                                                     "/run/agentcg/agentcg.sock).")
    return ap


def check_options(opts: argparse.Namespace) -> str | None:
    from agentcg.core.intents import Intent, IntentError
    for field in ("intent", "session_intent"):
        try:
            Intent.from_string(getattr(opts, field) or "")
        except IntentError as exc:
            return f"--{field.replace('_', '-')}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 with the answer on stdout; exit 1 (a non-blocking error for
    Claude Code: the tool call goes on unchanged) on bad input."""
    opts = parser().parse_args(argv)
    problem = check_options(opts)
    if problem:
        print(f"agentcg hook: {problem}", file=sys.stderr)
        return 1
    try:
        payload = json.load(sys.stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        print(f"agentcg hook: stdin is not the hook's JSON object: {exc}", file=sys.stderr)
        return 1
    if not isinstance(payload, dict):
        print("agentcg hook: stdin is not a JSON object", file=sys.stderr)
        return 1
    handler = HANDLERS.get(str(payload.get("hook_event_name")))
    answer = handler(payload, opts) if handler else None
    if answer is not None:
        json.dump(answer, sys.stdout)
        sys.stdout.write("\n")
    return 0


# --- .claude/settings.json ----------------------------------------------------------------

def hook_command(options: Sequence[str] = ()) -> str:
    return shlex.join([sys.executable, "-m", HOOK_MODULE, *options])


def settings_snippet(options: Sequence[str] = ()) -> dict[str, Any]:
    """The "hooks" section that runs this hook for Bash before and after each call."""
    entry = {"matcher": "Bash", "hooks": [{"type": "command", "command": hook_command(options),
                                           "timeout": HOOK_TIMEOUT_S}]}
    return {"hooks": {"PreToolUse": [entry], "PostToolUse": [json.loads(json.dumps(entry))]}}


def merge_settings(existing: Mapping[str, Any], snippet: Mapping[str, Any]) -> dict[str, Any]:
    """`existing` settings with this hook in place: every other key and hook
    kept, an earlier agentcg hook replaced (so that running it again is a no-op)."""
    merged = json.loads(json.dumps(existing))
    hooks = merged.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise ValueError(f"\"hooks\" is a {type(hooks).__name__}, not an object")
    for event, entries in snippet["hooks"].items():
        kept = [e for e in hooks.get(event, []) if not _is_ours(e)]
        hooks[event] = kept + list(entries)
    return merged


def _is_ours(entry: Any) -> bool:
    return isinstance(entry, dict) and any(
        isinstance(h, dict) and HOOK_MODULE in str(h.get("command", "")) for h in entry.get("hooks", []))


if __name__ == "__main__":
    sys.exit(main())
