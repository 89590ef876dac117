"""systemd/agentcg.toml.example documents every key with its real default."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from agentcg.core.config import Config, DaemonConfig, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agentcg.toml.example"


def test_example_is_exactly_the_defaults():
    assert parse_config(EXAMPLE.read_text()) == Config()


def test_every_daemon_key_is_in_the_example():
    written = set(tomllib.loads(EXAMPLE.read_text())["daemon"])
    assert written == {f.name for f in dataclasses.fields(DaemonConfig)}


def test_commented_examples_are_valid():
    """Uncommenting the sample lines must give a config the daemon accepts."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if re.match(r"^# (\[|[a-z_]+ = )", line):
            line = line[2:]
        lines.append(line)
    cfg = parse_config("\n".join(lines))
    assert cfg.default_grant.memory_max_bytes == 16 << 30
    assert cfg.default_grant.max_sessions == 16
    assert cfg.grants[1000].memory_max_bytes == 32 << 30
    assert cfg.grants[1000].pids_max == 8192          # filled from grants.default
    assert cfg.session_defaults.memory_max_bytes == 8 << 30
    assert cfg.call_defaults.memory_class == "normal"
    assert cfg.policy == {"preset": "adaptive", "dry_run": False, "ladder": {"calm_hold_ns": "300ms"}}
    assert cfg.bpf == Config().bpf
    assert [r.name for r in cfg.auto_rules] == ["pytest*", "npm-build"]


def test_policy_default_is_the_adaptive_preset():
    from agentcg.core.policy import load_ruleset
    default = load_ruleset(None)
    written = load_ruleset({"preset": "adaptive", "dry_run": False, "ladder": {"calm_hold_ns": "300ms"}})
    assert default.names() == written.names()
    assert default.ladder.calm_hold_ns == written.ladder.calm_hold_ns == 300_000_000
    assert default.dry_run is written.dry_run is False
