"""Match a new process's command against configured rules to pick its intent.

Pure: no I/O. A rule is parsed once from config and matched per exec.

Config form (a list, first match wins)::

    [[auto_rules]]
    command = "pytest*"            # glob on the program name (basename of argv[0] or the path)
    intent = { cpu = "batch", memory_max = "4G" }

    [[auto_rules]]
    regex = "^npm (test|run build)" # regular expression searched in the whole command line
    intent = { network = "none" }
    name = "npm-build"              # optional; shown as the reason

Exactly one of ``command`` or ``regex`` per rule.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class RuleError(ValueError):
    """A rule in config is malformed; the message names the rule and field."""


@dataclass(frozen=True)
class CommandRule:
    name: str
    intent: Mapping[str, Any]
    glob: str | None = None
    regex: re.Pattern | None = field(default=None, compare=False)

    def matches(self, program: str, cmdline: str) -> bool:
        if self.glob is not None:
            return fnmatch.fnmatchcase(program, self.glob)
        if self.regex is not None:
            return self.regex.search(cmdline) is not None
        return False


@dataclass(frozen=True)
class RuleMatch:
    rule: str          # rule name, for the reason
    intent: Mapping[str, Any]
    program: str
    cmdline: str

    @property
    def reason(self) -> str:
        return f"auto rule {self.rule!r} matched {self.cmdline!r}"


def parse_rules(raw: Sequence[Mapping[str, Any]] | None) -> tuple[CommandRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise RuleError(f"auto_rules: expected a list of tables, got {type(raw).__name__}")
    rules = []
    for i, item in enumerate(raw):
        where = f"auto_rules[{i}]"
        if not isinstance(item, Mapping):
            raise RuleError(f"{where}: expected a table, got {item!r}")
        unknown = set(item) - {"command", "regex", "intent", "name"}
        if unknown:
            raise RuleError(f"{where}: unknown field(s) {sorted(unknown)}")
        has_cmd, has_re = "command" in item, "regex" in item
        if has_cmd == has_re:
            raise RuleError(f"{where}: needs exactly one of 'command' (glob) or 'regex'")
        intent = item.get("intent", {})
        if not isinstance(intent, Mapping):
            raise RuleError(f"{where}.intent: expected a table, got {intent!r}")
        if has_cmd:
            glob = item["command"]
            if not isinstance(glob, str) or not glob:
                raise RuleError(f"{where}.command: expected a non-empty glob string, got {glob!r}")
            name = str(item.get("name") or glob)
            rules.append(CommandRule(name=name, intent=dict(intent), glob=glob))
        else:
            pat = item["regex"]
            if not isinstance(pat, str) or not pat:
                raise RuleError(f"{where}.regex: expected a non-empty string, got {pat!r}")
            try:
                rx = re.compile(pat)
            except re.error as exc:
                raise RuleError(f"{where}.regex: {pat!r} is not a valid regular expression: {exc}") from exc
            name = str(item.get("name") or pat)
            rules.append(CommandRule(name=name, intent=dict(intent), regex=rx))
    return tuple(rules)


def program_name(filename: str, argv: Sequence[str]) -> str:
    """The program's short name: basename of argv[0], else of the exec'd path."""
    first = argv[0] if argv else filename
    return first.rstrip("/").rsplit("/", 1)[-1]


def match_command(rules: Sequence[CommandRule], filename: str, argv: Sequence[str]) -> RuleMatch | None:
    """First rule matching this exec, or None (the session default applies)."""
    program = program_name(filename, argv)
    cmdline = " ".join([program, *argv[1:]]) if argv else program
    for rule in rules:
        if rule.matches(program, cmdline):
            return RuleMatch(rule=rule.name, intent=rule.intent, program=program, cmdline=cmdline)
    return None
