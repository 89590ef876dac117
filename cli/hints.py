"""Parsing what people and agents type: intents, resource hints, call names.

Pure functions; the intent fields and their validation come from
agentcg.core.intents so that the CLI, the hint wrapper and the daemon accept
exactly the same spellings.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agentcg.core.errors import FieldError
from agentcg.core.intents import Intent, IntentError
from agentcg.core.model import SESSION_NAME_RE
HINT_ENV = "AGENT_RESOURCE_HINT"
SESSION_ENV = "AGENTCG_SESSION"

# Intent fields that belong to a session, not to one call.
SESSION_ONLY_FIELDS = ("priority",)


class HintError(FieldError):
    """A bad hint or option value; the message names the field and the value."""


@dataclass(frozen=True)
class Hint:
    """A parsed AGENT_RESOURCE_HINT: the intent plus an optional call name."""

    intent: Intent
    name: str | None = None


def parse_intent(text: str | None, *, source: str = "--intent") -> Intent:
    """'memory=2G,cpu=latency' -> Intent; errors say where the text came from."""
    if not text or not text.strip():
        return Intent()
    try:
        return Intent.from_string(text)
    except IntentError as exc:
        raise HintError(f"{source} {exc.field}", exc.value, exc.why) from None


def parse_hint(text: str | None, *, source: str = HINT_ENV) -> Hint:
    """'memory=2G,cpu=batch,name=tests' -> Hint. Every intent field is allowed,
    plus name= (the tool call's name, shown in events and feedback)."""
    if not text or not text.strip():
        return Hint(Intent())
    name = None
    rest = []
    for part in re.split(r"[,\s]+", text.strip()):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() == "name":
            name = check_call_name(value.strip(), field=f"{source} name")
        elif part:
            rest.append(part)
    return Hint(parse_intent(",".join(rest), source=source), name)


def check_session_name(name: str, *, field: str = "session") -> str:
    if not SESSION_NAME_RE.match(name):
        raise HintError(field, name, "is not a session name (letters, digits, '_', '.', '-'; "
                                     "starts with a letter or digit; at most 63 characters)")
    return name


def check_call_name(name: str, *, field: str = "name") -> str:
    if not SESSION_NAME_RE.match(name):
        raise HintError(field, name, "is not a tool-call name (letters, digits, '_', '.', '-'; "
                                     "starts with a letter or digit; at most 63 characters)")
    return name


def call_name_for(argv: list[str]) -> str:
    """A readable tool-call name from a command line: the program's base name,
    skipping FOO=bar assignments; for `bash -c "pytest -q"` the first word of
    the script ('pytest')."""
    words: list[str] = []
    if len(argv) >= 3 and os.path.basename(argv[0]) in ("bash", "sh") and "-c" in argv[1:-1]:
        words = argv[argv.index("-c", 1) + 1].split()
    else:
        words = list(argv)
    for word in words:
        if "=" in word and not word.startswith("/"):
            continue  # FOO=bar env assignments
        base = os.path.basename(word)
        cleaned = re.sub(r"[^A-Za-z0-9_.-]", "", base)[:63].lstrip("_.-")
        if cleaned:
            return cleaned
    return "call"


def split_session_intent(intent: Intent) -> tuple[Intent, Intent]:
    """(session-level part, call-level part) of an intent given for one command:
    priority belongs to the session, everything else to the call."""
    data = intent.to_dict()
    session = {k: v for k, v in data.items() if k in SESSION_ONLY_FIELDS}
    call = {k: v for k, v in data.items() if k not in SESSION_ONLY_FIELDS}
    return Intent.from_dict(session), Intent.from_dict(call)
