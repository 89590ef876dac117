"""agentcgd configuration: TOML text -> frozen typed objects.

Every key has a default, so no file is needed. The file is optional
(`/etc/agentcg/agentcg.toml`); all keys are documented in docs/intents.md
("Configuration"). This module parses text; reading the file is the caller's
job (`load_config_text`), so the core stays free of I/O.

Errors name the key and the value: `ConfigError: daemon.straggler_policy:
'zap' is not one of kill|keep`.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from agentcg.core.config_gpu import GpuSettings, WorkerConfig, parse_gpu, parse_worker
from agentcg.core.config_metrics import MetricsConfig, parse_metrics
from agentcg.core.errors import FieldError
from agentcg.core.intents import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, Intent, IntentError
from agentcg.core.model import Grant
from agentcg.core.policy import PolicyConfigError, Ruleset, default_ruleset, load_ruleset
from agentcg.units import UnitError, parse_bytes

DEFAULT_CONFIG_PATH = "/etc/agentcg/agentcg.toml"
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup/agentcg"
DEFAULT_RUNTIME_DIR = "/run/agentcg"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_CONTROLLERS = ("cpu", "memory", "pids", "io")
STRAGGLER_POLICIES = ("kill", "keep")


class ConfigError(FieldError):
    """A bad configuration key or value; the message names both. `key` is the field."""

    @property
    def key(self) -> str:
        return self.field


@dataclass(frozen=True)
class DaemonConfig:
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    socket_path: str = ""          # "" -> <runtime_dir>/agentcg.sock
    socket_mode: int = 0o666
    state_path: str = ""           # "" -> <runtime_dir>/state.json
    event_log: str = ""            # "" -> <runtime_dir>/events.jsonl
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    require_controllers: bool = True
    controllers: tuple[str, ...] = DEFAULT_CONTROLLERS
    straggler_policy: str = "kill"
    straggler_grace_ms: int = 1000
    use_systemd_cgroup: bool = True
    # Under systemd, the unit whose delegated cgroup holds the tree (a sibling
    # of the daemon's own unit, never restarted with it); "" or absent: the
    # daemon's own unit cgroup, whose restart fails on systemd < 254.
    systemd_tree_unit: str = "agentcg-tree.service"
    watch_interval_ms: int = 500
    finished_keep: int = 1024
    log_level: str = "info"
    # The OOM killer's preference (/proc/<pid>/oom_score_adj, -1000..1000):
    # agent processes are protected, tool-call processes are the victims, and
    # a tool call's cgroup is killed whole (memory.oom.group).
    oom_score_adj: int = -1000     # the daemon's own: never the OOM killer's choice
    agent_oom_score_adj: int = -1000
    call_oom_score_adj: int = 500
    call_oom_priority_step: int = 40  # added per priority level below the highest (10)
    call_oom_group: bool = True
    # cpu.weight of the daemon's own cgroup (<root>/daemon, a sibling of the
    # sessions), 1..10000. (Under systemd with the tree unit the daemon stays
    # in its own unit's cgroup, and the unit's CPUWeight= does this.) The
    # daemon has to act exactly when tool calls keep every CPU busy; with the
    # default 100 it would wait behind them. It
    # sleeps otherwise, so a high weight costs the calls nothing.
    cpu_weight: int = 10000

    def call_oom_score_adj_for(self, priority: int | None) -> int:
        """A tool call's oom_score_adj: call_oom_score_adj, plus
        call_oom_priority_step for each priority level its session is below
        the highest, so that at a full budget the kernel's OOM killer (which
        ranks by size + oom_score_adj/1000 of the budget) takes lower
        priorities' calls first unless a higher one is much larger."""
        prio = PRIORITY_DEFAULT if priority is None else priority
        return max(-1000, min(1000, self.call_oom_score_adj
                              + max(0, PRIORITY_MAX - prio) * self.call_oom_priority_step))
    @property
    def socket(self) -> str:
        return self.socket_path or f"{self.runtime_dir.rstrip('/')}/agentcg.sock"

    @property
    def state_file(self) -> str:
        return self.state_path or f"{self.runtime_dir.rstrip('/')}/state.json"

    @property
    def event_log_file(self) -> str:
        return self.event_log or f"{self.runtime_dir.rstrip('/')}/events.jsonl"


ESCAPE_ACTIONS = ("", "kill", "keep")
STOP_TIMEOUT_MS = (10, 60_000)     # bounds of bpf.stop_timeout_ms


@dataclass(frozen=True)
class BpfConfig:
    """The [bpf] table: which kernel programs agentcgd loads (each only where
    the kernel has what it needs; see docs/bpf.md)."""
    enabled: bool = True           # false: cgroupfs only, no BPF at all
    network: bool = True           # cgroup BPF network intent and byte counters
    runq_latency: bool = True      # sched_wakeup/sched_switch run-queue latency per cgroup
    sched_ext: bool = True         # the agentcg sched_ext scheduler where the kernel has sched_ext
    escape_action: str = ""        # processes outliving their call: kill|keep; "" = daemon.straggler_policy
    stop_until_placed: bool = True  # automatic mode: SIGSTOP at exec until the child is in its call
    stop_timeout_ms: int = 2000    # a stopped child is continued after this even if not placed


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    session_defaults: Intent = field(default_factory=Intent)
    call_defaults: Intent = field(default_factory=Intent)
    default_grant: Grant = field(default_factory=Grant)
    root_grant: Grant = field(default_factory=lambda: Grant(max_priority=PRIORITY_MAX))
    grants: Mapping[int, Grant] = field(default_factory=dict)
    policy: Mapping[str, Any] | None = None  # the [policy] table as written (shown by status)
    ruleset: Ruleset = field(default_factory=default_ruleset)  # that table, parsed once at load
    bpf: BpfConfig = field(default_factory=BpfConfig)
    auto_rules: tuple = ()  # [[auto_rules]]: automatic mode's command -> intent rules (core.rules_match)
    worker: WorkerConfig = field(default_factory=WorkerConfig)   # [worker] (core/config_gpu.py)
    gpu: GpuSettings = field(default_factory=GpuSettings)        # [gpu] (core/config_gpu.py)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics] (core/config_metrics.py)

    def grant_for(self, uid: int) -> Grant:
        """The grant of `uid`: its own table, else root's (uid 0), else the default."""
        if uid in self.grants:
            return self.grants[uid]
        if uid == 0:
            return self.root_grant
        return self.default_grant


_DAEMON_KEYS = {
    "cgroup_root": str, "runtime_dir": str, "socket_path": str, "socket_mode": int,
    "state_path": str, "event_log": str, "max_message_bytes": "size",
    "require_controllers": bool, "controllers": list, "straggler_policy": str,
    "straggler_grace_ms": int, "use_systemd_cgroup": bool,
    "systemd_tree_unit": str, "watch_interval_ms": int,
    "finished_keep": int, "log_level": str, "oom_score_adj": "adj", "agent_oom_score_adj": "adj", "call_oom_score_adj": "adj", "call_oom_priority_step": int,
    "call_oom_group": bool, "cpu_weight": "weight",
}
_GRANT_KEYS = ("memory_max", "cpu_max", "pids_max", "max_priority", "max_sessions")
_KNOWN_CONTROLLERS = ("cpu", "memory", "pids", "io")


def parse_config(text: str) -> Config:
    """Parse TOML text into a Config. Raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("toml", text[:40] + ("..." if len(text) > 40 else ""), f"is not TOML: {exc}") from None
    return config_from_dict(data)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    _only(data, ("daemon", "defaults", "grants", "policy", "bpf", "auto_rules", "worker", "gpu",
                 "metrics"), "")
    daemon = _daemon(data.get("daemon", {}))
    defaults = data.get("defaults", {})
    _table(defaults, "defaults")
    _only(defaults, ("session", "call"), "defaults.")
    session_defaults = _intent(defaults.get("session", {}), "defaults.session")
    call_defaults = _intent(defaults.get("call", {}), "defaults.call")
    grants_tbl = data.get("grants", {})
    _table(grants_tbl, "grants")
    default_grant = Grant()
    root_grant = Grant(max_priority=PRIORITY_MAX)
    grants: dict[int, Grant] = {}
    for key, tbl in grants_tbl.items():
        where = f"grants.{key}"
        if key == "default":
            default_grant = _grant(tbl, where, Grant())
        else:
            try:
                uid = int(key)
            except ValueError:
                raise ConfigError(where, key, "is not 'default' or a numeric uid") from None
            if uid < 0:
                raise ConfigError(where, key, "is not a valid uid")
            base = root_grant if uid == 0 else default_grant
            grants[uid] = _grant(tbl, where, base)
    if 0 in grants:
        root_grant = grants.pop(0)
    # A uid table fills its unset keys from grants.default, which may come later in the file.
    if "default" in grants_tbl:
        grants = {uid: _grant(grants_tbl[str(uid)], f"grants.{uid}", default_grant)
                  for uid in grants}
    policy = data.get("policy")
    ruleset = _ruleset(policy)  # first: it rejects a [policy] that is not a table
    return Config(daemon=daemon, session_defaults=session_defaults, call_defaults=call_defaults,
                  default_grant=default_grant, root_grant=root_grant, grants=grants,
                  policy=None if policy is None else dict(policy), ruleset=ruleset,
                  bpf=_bpf(data.get("bpf", {})),
                  auto_rules=_auto_rules(data.get("auto_rules")),
                  worker=parse_worker(data.get("worker", {})), gpu=parse_gpu(data.get("gpu", {})),
                  metrics=parse_metrics(data.get("metrics", {})))


def _bpf(tbl: Any) -> BpfConfig:
    _table(tbl, "bpf")
    _only(tbl, ("enabled", "network", "runq_latency", "sched_ext", "escape_action", "stop_until_placed",
                "stop_timeout_ms"), "bpf.")
    timeout = tbl.get("stop_timeout_ms", 2000)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not STOP_TIMEOUT_MS[0] <= timeout <= STOP_TIMEOUT_MS[1]:
        raise ConfigError("bpf.stop_timeout_ms", timeout,
                          f"is not an integer from {STOP_TIMEOUT_MS[0]} to {STOP_TIMEOUT_MS[1]}")
    for key, value in tbl.items():
        if key not in ("escape_action", "stop_timeout_ms") and not isinstance(value, bool):
            raise ConfigError(f"bpf.{key}", value, "is not true or false")
    if tbl.get("escape_action", "") not in ESCAPE_ACTIONS:
        raise ConfigError("bpf.escape_action", tbl["escape_action"], "is not one of kill|keep")
    return BpfConfig(**tbl)


def _auto_rules(raw: Any) -> tuple:
    """[[auto_rules]]: parsed (and each rule's intent validated) at load time."""
    if raw is None:
        return ()
    from agentcg.core.rules_match import RuleError, parse_rules
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            if isinstance(item, Mapping) and "intent" in item:
                _intent(item["intent"], f"auto_rules[{i}].intent")
    try:
        return parse_rules(raw)
    except RuleError as exc:
        key, _, why = str(exc).partition(": ")
        raise ConfigError(key, raw, why) from None


def _ruleset(tbl: Any) -> Ruleset:
    """The [policy] table parsed (the default ruleset without one), at load
    time, so that a bad rule fails before the daemon starts."""
    try:
        return load_ruleset(tbl)
    except PolicyConfigError as exc:
        field_name, _, why = str(exc).partition(": ")
        raise ConfigError(field_name, tbl, why) from None


def load_config_text(path: str, text: str | None) -> Config:
    """`text` is the file's content, or None when the file does not exist."""
    if text is None:
        return Config()
    try:
        return parse_config(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.key}", exc.value, exc.why) from None


def _table(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(where, value, "is not a table")


def _only(tbl: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in tbl:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", tbl[key], f"is not a known key (known: {', '.join(allowed)})")


def _daemon(tbl: Any) -> DaemonConfig:
    _table(tbl, "daemon")
    _only(tbl, tuple(_DAEMON_KEYS), "daemon.")
    kw: dict[str, Any] = {}
    for key, value in tbl.items():
        kind = _DAEMON_KEYS[key]
        where = f"daemon.{key}"
        if kind == "size":
            try:
                value = parse_bytes(value)
            except UnitError:
                raise ConfigError(where, value, "is not a size (e.g. 1M)") from None
            if value < 1024:
                raise ConfigError(where, value, "must be at least 1K")
        elif kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(where, value, "is not true or false")
        elif kind == "weight":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
                raise ConfigError(where, value, "is not a cpu.weight (an integer 1..10000)")
        elif kind == "adj":
            if isinstance(value, bool) or not isinstance(value, int) or not -1000 <= value <= 1000:
                raise ConfigError(where, value, "is not an oom_score_adj (an integer -1000..1000)")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(where, value, "is not a non-negative integer")
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(where, value, "is not a string")
        elif kind is list:
            if not isinstance(value, list) or any(v not in _KNOWN_CONTROLLERS for v in value):
                raise ConfigError(where, value, f"is not a list of {'|'.join(_KNOWN_CONTROLLERS)}")
            value = tuple(value)
        kw[key] = value
    if kw.get("straggler_policy", "kill") not in STRAGGLER_POLICIES:
        raise ConfigError("daemon.straggler_policy", kw["straggler_policy"],
                          f"is not one of {'|'.join(STRAGGLER_POLICIES)}")
    if "socket_mode" in kw and kw["socket_mode"] > 0o777:
        raise ConfigError("daemon.socket_mode", kw["socket_mode"], "is not a file mode (e.g. 0o666)")
    for key in ("cgroup_root", "runtime_dir"):
        if key in kw and not kw[key].startswith("/"):
            raise ConfigError(f"daemon.{key}", kw[key], "is not an absolute path")
    unit = kw.get("systemd_tree_unit", "")
    if unit and ("/" in unit or not unit.endswith(".service")):
        raise ConfigError("daemon.systemd_tree_unit", unit, 'is not a service name (e.g. agentcg-tree.service) or ""')
    return DaemonConfig(**kw)


def _intent(tbl: Any, where: str) -> Intent:
    _table(tbl, where)
    try:
        return Intent.from_dict(tbl)
    except IntentError as exc:
        raise ConfigError(f"{where}.{exc.field}", exc.value, exc.why) from None


def _grant(tbl: Any, where: str, base: Grant) -> Grant:
    _table(tbl, where)
    _only(tbl, _GRANT_KEYS, f"{where}.")
    kw = base.to_dict()
    for key, value in tbl.items():
        w = f"{where}.{key}"
        try:
            if key == "memory_max":
                kw["memory_max_bytes"] = Intent.from_dict({"memory_max": value}).memory_max_bytes
            elif key == "cpu_max":
                kw["cpu_max_pct"] = Intent.from_dict({"cpu_max": value}).cpu_max_pct
            elif key == "pids_max":
                kw["pids_max"] = Intent.from_dict({"pids_max": value}).pids_max
            elif key == "max_priority":
                kw["max_priority"] = Intent.from_dict({"priority": value}).priority
            elif key == "max_sessions":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(w, value, "is not a non-negative integer")
                kw["max_sessions"] = value
        except IntentError as exc:
            raise ConfigError(w, value, exc.why) from None
    return Grant(**kw)


__all__ = ["BpfConfig", "Config", "ConfigError", "DaemonConfig", "parse_config", "config_from_dict",
           "load_config_text", "DEFAULT_CONFIG_PATH", "PRIORITY_MIN", "PRIORITY_MAX"]
