"""What every integration shares: a session per agent, one shell command run
as one tool call, the intent that the config's [[auto_rules]] give a command,
and the text the model reads afterwards. Standard library and agentcg only.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from agentcg.client import CallResult, Client, ProtocolError, Session
from agentcg.core.config import DEFAULT_CONFIG_PATH, load_config_text
from agentcg.core.intents import Intent
from agentcg.core.rules_match import CommandRule, match_command
from agentcg.units import format_bytes

DEFAULT_SHELL = "/bin/bash"
CONFIG_ENV = "AGENTCG_CONFIG"
# what a model reads of a command's output: its head and its tail
OUTPUT_LIMIT_BYTES = 64 << 10
EXIT_TIMED_OUT = 124   # like timeout(1)
DEFAULT_TIMEOUT_S = 600.0

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(raw: str, prefix: str = "", *, fallback: str = "agent") -> str:
    """A session or call name (SESSION_NAME_RE: letters, digits, '_', '.',
    '-', at most 63, starting with a letter or digit) made from any text."""
    cleaned = _NAME_BAD.sub("-", raw).strip("-_.")
    name = f"{prefix}{cleaned}" if cleaned else f"{prefix}{fallback}"
    name = name.lstrip("-_.")[:63].rstrip("-_.")
    return name or fallback


def ensure_session(client: Client, name: str, intent: Any = None) -> Session:
    """The session `name`, made now if it does not exist yet; it outlives
    this call (the agent's later tool calls run in it too)."""
    return client.session(name, intent=intent, exist_ok=True, end_on_exit=False)


# --- rules -------------------------------------------------------------------

def config_path(path: str | None = None) -> str:
    return path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_rules(path: str | None = None) -> tuple[CommandRule, ...]:
    """The [[auto_rules]] of agentcgd's config file (validated as the daemon
    validates them); none when the file does not exist."""
    where = config_path(path)
    try:
        with open(where, encoding="utf-8") as f:
            text: str | None = f.read()
    except FileNotFoundError:
        text = None
    except PermissionError:   # a root-only config: the daemon still applies its rules to automatic mode
        return ()
    return load_config_text(where, text).auto_rules


def command_words(command: str) -> list[str]:
    """The words of a shell command line from its program on: leading
    FOO=bar assignments skipped; a line shlex cannot split is split on blanks."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    return words


def rule_for_command(rules: Sequence[CommandRule], command: str) -> tuple[dict[str, Any], str | None]:
    """(intent, rule name) of the first rule matching a shell command line:
    `command` globs match its program's name, `regex` rules the whole line."""
    words = command_words(command)
    if not words:
        return {}, None
    match = match_command(rules, words[0], words)
    if match is None:
        for rule in rules:   # a regex over the line as the agent wrote it (pipes, quotes and all)
            if rule.regex is not None and rule.regex.search(command):
                return dict(rule.intent), rule.name
        return {}, None
    return dict(match.intent), match.rule


def intent_text(*intents: Mapping[str, Any] | str | None) -> str:
    """The intents merged, later ones over earlier ones, as `k=v,...` text
    that `agentcg run --intent` reads back."""
    merged = Intent()
    for item in intents:
        if item:
            merged = Intent.parse(item).over(merged)
    return merged.describe()


# --- one shell command as one tool call ---------------------------------------

@dataclass
class ShellOutcome:
    """A shell command's end: its status and output, and agentcg's account."""

    command: str
    exit_status: int
    output: str
    result: CallResult
    name: str = ""
    truncated: bool = False
    timed_out: bool = False
    rule: str | None = None
    intent: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feedback(self) -> list[dict[str, Any]]:
        return list(self.result.feedback)

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"exit_status": self.exit_status, "output": self.output, "truncated": self.truncated,
                "timed_out": self.timed_out, "session": r.session, "call": r.call, "name": self.name, "intent": self.intent,
                "rule": self.rule, "stats": r.stats, "limits": r.limits, "feedback": r.feedback,
                **({"unaccounted": r.unaccounted} if r.unaccounted else {})}

    def text(self) -> str:
        """What the model reads: the output, the exit status, agentcg's feedback."""
        parts = [self.output.rstrip("\n")] if self.output else []
        if self.truncated:
            parts.append(f"[output truncated to {format_bytes(OUTPUT_LIMIT_BYTES)}: head and tail kept]")
        if self.timed_out:
            parts.append(f"[timed out: killed after {self.extra.get('timeout_s')} s]")
        parts.append(f"exit status {self.exit_status}")
        parts.extend(report_lines(self.result.stats, self.result.limits, self.result.feedback,
                                  call=self.result.call, name=self.name or None, always=False))
        return "\n".join(parts)


def run_shell(session: Session, command: str, *, intent: Any = None, base_intent: Any = None, name: str | None = None,
              cwd: str | None = None, timeout_s: float | None = None, env: Mapping[str, str] | None = None,
              shell: str = DEFAULT_SHELL, rules: Sequence[CommandRule] = ()) -> ShellOutcome:
    """Run `shell -c command` as one tool call of `session` and wait for it.

    The intent: `base_intent`, the first matching rule's over it, `intent` over both. stdin is
    /dev/null; stdout and stderr go, interleaved, to a file read afterwards
    (a file, not a pipe: the command is then born in its cgroup, and a
    background process that keeps the output open cannot hang the caller).
    After timeout_s the command is killed (exit status 124); the daemon kills
    what is left of the call at its end."""
    if not isinstance(command, str) or not command.strip():
        raise ValueError("command: empty command")
    if cwd is not None and not os.path.isdir(cwd):
        raise ValueError(f"cwd: {cwd!r} is not a directory")
    rule_intent, rule = rule_for_command(rules, command)
    text = intent_text(base_intent, rule_intent, intent)
    call_name = name or safe_name(command_words(command)[0] if command_words(command) else "", fallback="sh")
    with tempfile.TemporaryFile() as out:
        call_name = safe_name(call_name, fallback="sh")
        call = session.tool_call(call_name, intent=text or None)
        handle = call.popen([shell, "-c", command], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            cwd=cwd, env=dict(env) if env is not None else None)
        timed_out = False
        try:
            result = handle.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            handle.kill()
            result = handle.wait()
        out.seek(0)
        output, truncated = _bounded(out.read())
    status = EXIT_TIMED_OUT if timed_out else result.exit_status
    return ShellOutcome(command=command, exit_status=status, output=output, result=result, name=call_name, truncated=truncated,
                        timed_out=timed_out, rule=rule, intent=text, extra={"timeout_s": timeout_s})


class ShellRunner:
    """Runs commands of one session; the session is made on first use."""

    def __init__(self, session: str, *, intent: Any = None, session_intent: Any = None,
                 socket_path: str | None = None, cwd: str | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 config: str | None = None, client: Client | None = None):
        self.session_name = session
        self.intent = intent
        self.session_intent = session_intent
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.rules = load_rules(config)
        self.client = client or Client(socket_path=socket_path)
        self._session = None

    def session(self):
        if self._session is None:
            self._session = ensure_session(self.client, self.session_name, self.session_intent)
        return self._session

    def outcome(self, command: str, intent: str | None = None, cwd: str | None = None,
                timeout_s: float | None = None) -> ShellOutcome:
        """Run one command: the runner's intent under the matching rule's,
        under the one given here (the model's). Raises ProtocolError when
        agentcgd refuses the call, ValueError for bad input."""
        return run_shell(self.session(), command, base_intent=self.intent, intent=intent, cwd=cwd or self.cwd,
                         timeout_s=timeout_s or self.timeout_s, rules=self.rules)

    def run(self, command: str, intent: str | None = None, cwd: str | None = None,
            timeout_s: float | None = None) -> str:
        """The text the model reads; a refused call (a bad intent, over the
        budget) is text too, so that the model can correct itself."""
        try:
            return self.outcome(command, intent, cwd, timeout_s).text()
        except ProtocolError as exc:
            return f"agentcg refused the command: {exc.message} [{exc.code}]"
        except (ValueError, FileNotFoundError) as exc:
            return f"agentcg could not run the command: {exc}"


def _bounded(data: bytes, limit: int = OUTPUT_LIMIT_BYTES) -> tuple[str, bool]:
    if len(data) <= limit:
        return data.decode("utf-8", "replace"), False
    half = limit // 2
    return (data[:half].decode("utf-8", "replace") + "\n[...]\n"
            + data[-half:].decode("utf-8", "replace")), True


# --- what the model reads -------------------------------------------------------

def report_lines(stats: Mapping[str, Any], limits: Mapping[str, Any], feedback: Sequence[Any], *,
                 call: int | None = None, name: str | None = None, exit_status: int | None = None,
                 always: bool = True) -> list[str]:
    """'agentcg: ...' lines about one finished call: the kernel's
    interventions (feedback) and, with `always` or when there were any, the
    numbers (wall time, memory peak against the call's limits)."""
    lines = [f"agentcg: {line}" for line in feedback_lines(feedback)]
    if always or lines:
        lines.insert(0, "agentcg: " + usage_summary(stats, limits, call=call, name=name, exit_status=exit_status))
    return lines


def usage_summary(stats: Mapping[str, Any], limits: Mapping[str, Any], *, call: int | None = None,
                  name: str | None = None, exit_status: int | None = None) -> str:
    """'call 3 (pytest) exit 0: 2.1s wall, memory peak 312M (memory.high 1G, memory.max 4G)'."""
    head = "call" + (f" {call}" if call is not None else "") + (f" ({name})" if name else "")
    if exit_status is not None:
        head += f" exit {exit_status}"
    parts = []
    wall_ns = stats.get("wall_ns")
    if isinstance(wall_ns, (int, float)) and wall_ns > 0:
        parts.append(f"{wall_ns / 1e9:.1f}s wall")
    peak = stats.get("memory_peak_bytes")
    if isinstance(peak, int):
        caps = [f"{label} {format_bytes(limits[key])}" for key, label in
                (("memory_high_bytes", "memory.high"), ("memory_max_bytes", "memory.max"))
                if isinstance(limits.get(key), int)]
        parts.append(f"memory peak {format_bytes(peak)}" + (f" ({', '.join(caps)})" if caps else ""))
    if isinstance(stats.get("pids_peak"), int):
        parts.append(f"{stats['pids_peak']} processes at most")
    return head + (": " + ", ".join(parts) if parts else "")


def feedback_lines(feedback: Sequence[Any]) -> list[str]:
    out = []
    for item in feedback or []:
        if isinstance(item, Mapping):
            msg = str(item.get("message") or item.get("kind") or item)
            hint = item.get("suggestion")
            out.append(f"{msg} {hint}" if hint and hint not in msg else msg)
        else:
            out.append(str(item))
    return out
