"""How long a tool call is expected to take, from what it is.

Pure. The estimate, in order of trust:
1. the intent's `duration`, if the agent declared one;
2. the history of the same command in this session;
3. the history of the same command on this host (all sessions);
4. a default.

A command is its program and, for programs with subcommands
(`SUBCOMMAND_PROGRAMS`), the first one (`normalise`): `pytest -q tests/x.py`
is `pytest`, `pip install -e .` is `pip install`, `git -C repo
status` is `git status`, `python -m pytest` is `pytest`.

Estimator: an exponentially weighted mean and variance of log(duration).
Durations are multiplicative (a warm build 2 s, a cold one 200 s), so the log
turns "10x slower" into a fixed step and the mean into a geometric mean (the
median of a log-normal). Each step's move of the mean is clipped to 3 standard
deviations (at least 3 x 0.25 in log units), so one 100x outlier moves the
estimate by ~20%, while the variance takes the full deviation: a command that
really became slower widens its spread and is followed within a few runs.
Three numbers per command instead of a window of samples; alpha = 0.25 weighs
roughly the last 7 runs. Memory is bounded: an LRU of commands per session and
on the host, and an LRU of sessions. `to_dict`/`from_dict` round-trip the lot.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

ALPHA = 0.25
CLIP_SD = 3.0
SD_FLOOR_LOG = 0.25
Z_P75 = 0.6745
MIN_DURATION_S = 1e-3
STATE_VERSION = 1

_WORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_:+-]{0,39}$")   # a word, not a path or a file
_SHELLS = {"sh", "bash", "dash", "zsh"}
_WRAPPERS = {"sudo", "env", "nice", "nohup", "time", "timeout", "stdbuf", "ionice", "exec", "command"}
_WRAPPER_POSITIONALS = {"timeout": 1}            # timeout DURATION CMD
_SEPARATORS = {"&&", "||", ";", "|", "&"}
# global options that take a value, so that `git -C repo status` is `git status`
_OPTS_WITH_VALUE = {"git": {"-C", "-c", "--git-dir", "--work-tree"}, "make": {"-C", "-f", "-j", "-l"},
                    "docker": {"-H", "--context", "--config", "--host"},
                    "kubectl": {"-n", "--namespace", "--context"}, "nice": {"-n"}, "sudo": {"-u", "-g"}}
_PYTHON_RE = re.compile(r"^python[0-9.]*$")
# programs whose first word is a subcommand (or a make target); for any other
# program a first word is an argument (`pytest tests`, `ls src`), which would
# otherwise split one command into as many keys as it has arguments
SUBCOMMAND_PROGRAMS = frozenset("""
    apt apt-get bazel brew bun bundle cabal cargo cmake composer conda deno dnf docker dotnet gh git go gradle
    hatch helm just kubectl make mamba mix mvn ninja nix nox npm pdm pip pip3 pipx pnpm podman poetry rails rake
    rustup stack systemctl terraform tox uv yarn zig
""".split())


def _split(cmd: Sequence[str] | str) -> list[str]:
    if isinstance(cmd, str):
        try:
            return shlex.split(cmd)
        except ValueError:           # unbalanced quotes: words are good enough
            return cmd.split()
    return list(cmd)


def normalise(cmd: Sequence[str] | str) -> str:
    """argv (or a command line) -> "prog" or "prog subcommand"; "" when empty."""
    argv = _split(cmd)
    for _ in range(4):               # shells and interpreters nest; a few levels are plenty
        argv = _strip_wrappers(argv)
        if not argv:
            return ""
        prog = os.path.basename(argv[0])
        rest = argv[1:]
        if prog in _SHELLS and "-c" in rest[:-1]:
            argv = _first_command(_split(rest[rest.index("-c") + 1]))
            continue
        if _PYTHON_RE.match(prog):
            if "-m" in rest[:-1]:
                argv = rest[rest.index("-m") + 1:]
                continue
            script = next((a for a in rest if not a.startswith("-")), None)
            if script is None:
                return "python"
            return os.path.basename(script)
        return _with_subcommand(prog, rest)
    return os.path.basename(argv[0]) if argv else ""


def _first_command(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a in _SEPARATORS:
            break
        out.append(a)
    return out


def _strip_wrappers(argv: list[str]) -> list[str]:
    i = 0
    while i < len(argv) and "=" in argv[i] and not argv[i].startswith(("-", "=")):
        i += 1                       # FOO=1 cmd
    while i < len(argv) and os.path.basename(argv[i]) in _WRAPPERS:
        w = os.path.basename(argv[i])
        i += 1
        takes = _OPTS_WITH_VALUE.get(w, set())
        while i < len(argv) and (argv[i].startswith("-") or (w == "env" and "=" in argv[i])):
            i += 2 if argv[i] in takes else 1
        i += _WRAPPER_POSITIONALS.get(w, 0)
    return argv[i:]


def _with_subcommand(prog: str, rest: list[str]) -> str:
    if prog not in SUBCOMMAND_PROGRAMS:
        return prog
    takes = _OPTS_WITH_VALUE.get(prog, set())
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 2 if rest[i] in takes else 1
    if i < len(rest) and _WORD_RE.match(rest[i]):
        return f"{prog} {rest[i]}"
    return prog


@dataclass
class Stat:
    """EWMA of log(duration) for one command."""
    n: int = 0
    mean_log: float = 0.0
    var_log: float = 0.0

    def add(self, duration_s: float) -> None:
        x = math.log(max(duration_s, MIN_DURATION_S))
        if self.n == 0:
            self.mean_log, self.var_log = x, 0.0
        else:
            dev = x - self.mean_log
            lim = CLIP_SD * max(math.sqrt(self.var_log), SD_FLOOR_LOG)
            self.mean_log += ALPHA * max(-lim, min(lim, dev))
            self.var_log = (1 - ALPHA) * (self.var_log + ALPHA * dev * dev)
        self.n += 1

    @property
    def typical_s(self) -> float:
        return math.exp(self.mean_log)

    @property
    def p75_s(self) -> float:
        return math.exp(self.mean_log + Z_P75 * math.sqrt(self.var_log))

    def to_list(self) -> list:
        return [self.n, round(self.mean_log, 6), round(self.var_log, 6)]

    @classmethod
    def from_list(cls, v: Any, where: str) -> "Stat":
        if (not isinstance(v, list) or len(v) != 3 or not isinstance(v[0], int) or v[0] < 1
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v[1:]) or v[2] < 0):
            raise ValueError(f"{where}: expected [count >= 1, mean_log, var_log >= 0], got {v!r}")
        return cls(v[0], float(v[1]), float(v[2]))


@dataclass(frozen=True)
class DurationEstimate:
    duration_s: float                # the typical duration (median)
    p75_s: float                     # 3 runs in 4 are at most this long
    source: str                      # "intent" | "session" | "host" | "default"
    command: str
    samples: int
    reason: str


class _Lru(OrderedDict):
    def touch(self, key: str, make, limit: int):
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = make()
            while len(self) > limit:
                self.popitem(last=False)
        return self[key]


class Durations:
    """Per-command duration history: for a session and for the host."""

    def __init__(self, *, default_s: float = 10.0, host_commands: int = 512, session_commands: int = 64,
                 sessions: int = 256):
        if default_s <= 0 or min(host_commands, session_commands, sessions) < 1:
            raise ValueError("default_s must be positive and the limits at least 1")
        self.default_s = default_s
        self.limits = (host_commands, session_commands, sessions)
        self.host: _Lru = _Lru()
        self.by_session: _Lru = _Lru()

    def record(self, session_id: str, cmd: Sequence[str] | str, duration_s: float) -> str:
        """Add one finished call; -> its command key ("" commands are not kept)."""
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s: expected a finite number >= 0, got {duration_s!r}")
        key = normalise(cmd)
        if not key:
            return key
        host_n, ses_n, nses = self.limits
        self.host.touch(key, Stat, host_n).add(duration_s)
        ses = self.by_session.touch(session_id, _Lru, nses)
        ses.touch(key, Stat, ses_n).add(duration_s)
        return key

    def forget_session(self, session_id: str) -> None:
        self.by_session.pop(session_id, None)

    def estimate(self, session_id: str, cmd: Sequence[str] | str,
                 declared_s: float | None = None) -> DurationEstimate:
        key = normalise(cmd)
        if declared_s is not None:
            return DurationEstimate(declared_s, declared_s, "intent", key, 0,
                                    f"declared duration {declared_s:g} s")
        for source, table in (("session", self.by_session.get(session_id) or {}), ("host", self.host)):
            st = table.get(key) if key else None
            if st is not None:
                return DurationEstimate(st.typical_s, st.p75_s, source, key, st.n,
                                        f"{key!r}: typical {st.typical_s:.1f} s, p75 {st.p75_s:.1f} s over "
                                        f"{st.n} runs in this {source}")
        return DurationEstimate(self.default_s, self.default_s, "default", key, 0,
                                f"{key or 'the command'!r} has no history: default {self.default_s:g} s")

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "host": {k: v.to_list() for k, v in self.host.items()},
                "sessions": {s: {k: v.to_list() for k, v in t.items()} for s, t in self.by_session.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **limits: Any) -> "Durations":
        """Inverse of to_dict; LRU order is kept. Bad data raises ValueError naming the entry."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise ValueError(f"durations: expected a dict with version {STATE_VERSION}, got "
                             f"{data.get('version') if isinstance(data, Mapping) else type(data).__name__!r}")
        d = cls(**limits)
        host_n, ses_n, nses = d.limits
        for k, v in _mapping(data.get("host", {}), "durations.host").items():
            d.host.touch(k, lambda v=v, k=k: Stat.from_list(v, f"durations.host[{k!r}]"), host_n)
        for s, table in _mapping(data.get("sessions", {}), "durations.sessions").items():
            t = d.by_session.touch(s, _Lru, nses)
            for k, v in _mapping(table, f"durations.sessions[{s!r}]").items():
                t.touch(k, lambda v=v, k=k: Stat.from_list(v, f"durations.sessions[{s!r}][{k!r}]"), ses_n)
        return d


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(v).__name__}")
    return v
