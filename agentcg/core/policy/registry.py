"""Rule registry and the `[policy]` config section, parsed once into frozen objects.

A rule is a small frozen dataclass registered under a name. Its fields are
its arguments; the unit is in the name (`hold_ns`, `step_min_bytes`,
`high_pct`) and the parser accepts what people type for it ("64M", "500ms").
Bad input raises PolicyConfigError naming the field and the value.

    [policy]
    rules = [
      { name = "psi_pressure", args = { stall_threshold_us = 10000, window_us = 500000 } },
      { name = "burst_borrow", args = { default_call_bytes = "64M" } },
      { name = "throttle" }, { name = "reclaim" }, { name = "freeze" }, { name = "kill" },
    ]
    [policy.ladder]
    calm_hold_ns = "300ms"
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from agentcg.core.policy.base import LadderStep, RuleBase

from agentcg.units import UnitError, parse_bytes, parse_duration_ns

_REGISTRY: dict[str, type] = {}


class PolicyConfigError(ValueError):
    """A `[policy]` entry that cannot be used; the message names the field."""


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"rule {name!r} registered twice")
        cls.rule_name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def registered() -> dict[str, type]:
    return dict(_REGISTRY)


def _coerce(field_path: str, fname: str, ftype: Any, value: Any) -> Any:
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(field_path, fname, inner[0], value)
    try:
        if ftype is bool:
            if not isinstance(value, bool):
                raise PolicyConfigError(f"{field_path}: expected true or false, got {value!r}")
            return value
        if ftype is int:
            if fname.endswith("_bytes"):
                return parse_bytes(value)
            if fname.endswith("_ns"):
                return parse_duration_ns(value)
            if fname.endswith("_us"):
                if isinstance(value, str):
                    return parse_duration_ns(value) // 1000
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyConfigError(f"{field_path}: expected an integer, got {value!r}")
            if value < 0:
                raise PolicyConfigError(f"{field_path}: must not be negative, got {value!r}")
            return value
        if ftype is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PolicyConfigError(f"{field_path}: expected a number, got {value!r}")
            if fname.endswith("_pct") and not 0 <= value <= 100:
                raise PolicyConfigError(f"{field_path}: a percentage 0..100, got {value!r}")
            return float(value)
        if ftype is str:
            if not isinstance(value, str):
                raise PolicyConfigError(f"{field_path}: expected a string, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise PolicyConfigError(f"{field_path}: expected a list of strings, got {value!r}")
            return tuple(value)
    except UnitError as exc:
        raise PolicyConfigError(f"{field_path}: {exc}") from None
    raise PolicyConfigError(f"{field_path}: unsupported argument type {ftype!r}")


def build_rule(name: str, args: dict[str, Any] | None, where: str = "policy.rules") -> RuleBase:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PolicyConfigError(f"{where}.name: unknown rule {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    args = dict(args or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key, value in args.items():
        if key not in fields:
            raise PolicyConfigError(f"{where}.args.{key}: rule {name!r} has no argument {key!r} "
                                    f"(it takes: {', '.join(fields) or 'none'})")
        kw[key] = _coerce(f"{where}.args.{key}", key, hints[key], value)
    try:
        rule = cls(**kw)
    except TypeError as exc:
        raise PolicyConfigError(f"{where}.args: {exc}") from None
    problem = rule.check()
    if problem:
        raise PolicyConfigError(f"{where}.args.{problem}")
    return rule


@dataclass(frozen=True)
class LadderSettings:
    """How the memory ladder steps down once pressure is gone.

    calm_hold_ns: pressure must stay away this long before the ladder undoes
    its steps (hysteresis against flapping)."""

    calm_hold_ns: int = 300_000_000


@dataclass(frozen=True)
class Ruleset:
    rules: tuple[RuleBase, ...] = ()
    ladder: LadderSettings = LadderSettings()
    dry_run: bool = False

    def names(self) -> list[str]:
        return [r.rule_name for r in self.rules]

    def ladder_steps(self) -> list[LadderStep]:
        """The ladder's steps, lowest first."""
        return sorted((r for r in self.rules if isinstance(r, LadderStep)), key=lambda r: r.step)

    def find(self, name: str) -> RuleBase | None:
        for r in self.rules:
            if r.rule_name == name:
                return r
        return None


def load_ruleset(section: dict[str, Any] | None) -> Ruleset:
    """Parse the `[policy]` table (a dict from tomllib)."""
    import agentcg.core.policy  # noqa: F401  (its __init__ imports, and so registers, every rule)

    if section is None:
        return default_ruleset()
    if not isinstance(section, dict):
        raise PolicyConfigError(f"policy: expected a table, got {section!r}")
    known = {"rules", "ladder", "dry_run", "preset"}
    for key in section:
        if key not in known:
            raise PolicyConfigError(f"policy.{key}: unknown key (known: {', '.join(sorted(known))})")
    dry_run = section.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise PolicyConfigError(f"policy.dry_run: expected true or false, got {dry_run!r}")
    preset = section.get("preset")
    if preset is not None:
        if "rules" in section:
            raise PolicyConfigError("policy.preset: give either preset or rules, not both")
        from agentcg.core.policy.presets import PRESETS
        if preset not in PRESETS:
            raise PolicyConfigError(f"policy.preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        raw_rules = PRESETS[preset]
    else:
        raw_rules = section.get("rules")
        if raw_rules is None:
            from agentcg.core.policy.presets import PRESETS
            raw_rules = PRESETS["adaptive"]
    if not isinstance(raw_rules, list):
        raise PolicyConfigError(f"policy.rules: expected a list of {{name, args}} tables, got {raw_rules!r}")
    built = []
    for i, entry in enumerate(raw_rules):
        where = f"policy.rules[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise PolicyConfigError(f"{where}: expected a table with a name, got {entry!r}")
        extra = set(entry) - {"name", "args"}
        if extra:
            raise PolicyConfigError(f"{where}.{sorted(extra)[0]}: unknown key (a rule has name and args)")
        args = entry.get("args", {})
        if not isinstance(args, dict):
            raise PolicyConfigError(f"{where}.args: expected a table, got {args!r}")
        built.append(build_rule(entry["name"], args, where))
    ladder_raw = section.get("ladder", {})
    if not isinstance(ladder_raw, dict):
        raise PolicyConfigError(f"policy.ladder: expected a table, got {ladder_raw!r}")
    lkw = {}
    hints = typing.get_type_hints(LadderSettings)
    for key, value in ladder_raw.items():
        if key not in hints:
            raise PolicyConfigError(f"policy.ladder.{key}: unknown key (known: {', '.join(hints)})")
        lkw[key] = _coerce(f"policy.ladder.{key}", key, hints[key], value)
    return Ruleset(rules=tuple(built), ladder=LadderSettings(**lkw), dry_run=dry_run)


def default_ruleset() -> Ruleset:
    return load_ruleset({"preset": "adaptive"})

