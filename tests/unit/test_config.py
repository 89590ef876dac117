"""Configuration: defaults without a file, typed values, errors naming the key."""
from __future__ import annotations

import pytest

from agentcg.core.config import Config, ConfigError, load_config_text, parse_config


def test_no_file_means_defaults():
    cfg = load_config_text("/etc/agentcg/agentcg.toml", None)
    assert cfg == Config()
    d = cfg.daemon
    assert d.cgroup_root == "/sys/fs/cgroup/agentcg"
    assert d.socket == "/run/agentcg/agentcg.sock"
    assert d.state_file == "/run/agentcg/state.json"
    assert d.event_log_file == "/run/agentcg/events.jsonl"
    assert d.require_controllers is True and d.straggler_policy == "kill"
    assert cfg.grant_for(1000).max_priority == 5 and cfg.grant_for(0).max_priority == 10


def test_values_parse():
    cfg = parse_config("""
[daemon]
runtime_dir = "/tmp/x"
max_message_bytes = "64K"
require_controllers = false
straggler_policy = "keep"
[defaults.call]
memory = "512M"
[grants.default]
memory_max = "4G"
[grants.1000]
pids_max = 10
""")
    assert cfg.daemon.socket == "/tmp/x/agentcg.sock"
    assert cfg.daemon.max_message_bytes == 65536
    assert cfg.call_defaults.memory_bytes == 512 << 20
    assert cfg.grant_for(1000).pids_max == 10
    assert cfg.grant_for(1000).memory_max_bytes == 4 << 30
    assert cfg.grant_for(1001).memory_max_bytes == 4 << 30


@pytest.mark.parametrize("text,key", [
    ('[daemon]\nstraggler_policy = "zap"', "daemon.straggler_policy"),
    ('[daemon]\nbogus = 1', "daemon.bogus"),
    ('[daemon]\nrequire_controllers = "yes"', "daemon.require_controllers"),
    ('[daemon]\ncgroup_root = "relative"', "daemon.cgroup_root"),
    ('[defaults.call]\nmemory = "12X"', "defaults.call.memory"),
    ('[grants.alice]\npids_max = 1', "grants.alice"),
    ('[grants.default]\nmemory_max = "lots"', "grants.default.memory_max"),
])
def test_errors_name_the_key(text, key):
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    assert str(ei.value).startswith(key + ":")


def test_file_path_in_error():
    with pytest.raises(ConfigError, match=r"^/etc/a.toml: daemon.bogus: 1 is not a known key"):
        load_config_text("/etc/a.toml", "[daemon]\nbogus = 1")
