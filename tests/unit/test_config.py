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


def test_bpf_table_and_auto_rules_parse_and_reach_the_hook(tmp_path):
    """[bpf] switches and [[auto_rules]] are parsed at load time and handed to
    the eBPF hook that automatic mode uses."""
    cfg = parse_config("""
[daemon]
straggler_policy = "keep"
[bpf]
sched_ext = false
runq_latency = false
[[auto_rules]]
command = "pytest*"
intent = { cpu = "batch", memory_max = "4G" }
[[auto_rules]]
regex = "^npm (test|run build)"
intent = { network = "none" }
name = "npm-build"
""")
    assert cfg.bpf.sched_ext is False and cfg.bpf.runq_latency is False and cfg.bpf.network is True
    assert [r.name for r in cfg.auto_rules] == ["pytest*", "npm-build"]
    assert cfg.auto_rules[0].matches("pytest", "pytest -x tests") and not cfg.auto_rules[0].matches("git", "git status")
    from agentcg.daemon.app import build
    daemon = build(cfg, root=str(tmp_path / "cg"))
    hook = next(h for h in daemon.hooks.hooks if getattr(h, "name", "") == "bpf")
    assert hook.use_sched_ext is False and hook.runq is False and hook.network is True
    assert hook.attr.escape_action == "keep"
    assert hook.stop_until_placed is True and hook.stop_timeout_ms == 2000   # the defaults
    stop = build(parse_config("[bpf]\nstop_until_placed = false\nstop_timeout_ms = 500\n"), root=str(tmp_path / "cg3"))
    h3 = next(h for h in stop.hooks.hooks if getattr(h, "name", "") == "bpf")
    assert h3.stop_until_placed is False and h3.stop_timeout_ms == 500
    m = hook.attr.rules[1].matches("npm", "npm run build")
    assert m
    off = build(parse_config("[bpf]\nenabled = false\n"), root=str(tmp_path / "cg2"))
    assert not [h for h in off.hooks.hooks if getattr(h, "name", "") == "bpf"]


@pytest.mark.parametrize("text,key", [
    ("[bpf]\nsched_ext = 1\n", "bpf.sched_ext"),
    ("[bpf]\nescape_action = \"zap\"\n", "bpf.escape_action"),
    ("[bpf]\nfoo = true\n", "bpf.foo"),
    ("[bpf]\nstop_until_placed = \"yes\"\n", "bpf.stop_until_placed"),
    ("[bpf]\nstop_timeout_ms = 5\n", "bpf.stop_timeout_ms"),
    ("[bpf]\nstop_timeout_ms = \"2s\"\n", "bpf.stop_timeout_ms"),
    ("[bpf]\nstop_timeout_ms = true\n", "bpf.stop_timeout_ms"),
    ("[[auto_rules]]\nintent = {}\n", "auto_rules[0]"),
    ("[[auto_rules]]\ncommand = \"make\"\nintent = { memory = \"lots\" }\n", "auto_rules[0].intent.memory"),
])
def test_bpf_and_auto_rule_errors_name_the_key(text, key):
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    assert ei.value.key == key, str(ei.value)


def test_call_oom_score_adj_rises_as_priority_falls():
    d = parse_config("[daemon]\ncall_oom_score_adj = 500\ncall_oom_priority_step = 40\n").daemon
    assert d.call_oom_score_adj_for(10) == 500
    assert d.call_oom_score_adj_for(8) == 580 < d.call_oom_score_adj_for(2) == 820
    assert d.call_oom_score_adj_for(None) == d.call_oom_score_adj_for(5) == 700   # the default priority
    assert parse_config("[daemon]\ncall_oom_score_adj = 900\n").daemon.call_oom_score_adj_for(1) == 1000  # clamped
    with pytest.raises(ConfigError, match="call_oom_priority_step"):
        parse_config("[daemon]\ncall_oom_priority_step = -5\n")


def test_daemon_cpu_weight_is_a_cgroup_weight():
    assert parse_config("").daemon.cpu_weight == 10000
    assert parse_config("[daemon]\ncpu_weight = 500\n").daemon.cpu_weight == 500
    for bad in ("0", "10001", "true", '"high"'):
        with pytest.raises(ConfigError, match="daemon.cpu_weight.*cpu.weight"):
            parse_config(f"[daemon]\ncpu_weight = {bad}\n")


def test_policy_table_is_parsed_once_at_load_into_the_ruleset():
    cfg = parse_config('[policy]\npreset = "static"\n')
    assert cfg.policy == {"preset": "static"}
    assert cfg.ruleset.names() == ["static_session_max"]
    assert Config().ruleset.names() == parse_config("").ruleset.names()  # no table: the default ruleset
    assert "kill" in Config().ruleset.names()


def test_config_intent_and_hint_errors_are_one_field_error():
    from agentcg.cli.hints import HintError, parse_intent
    from agentcg.core.errors import FieldError
    from agentcg.core.intents import Intent, IntentError

    with pytest.raises(ConfigError) as ce:
        parse_config("[daemon]\nstraggler_policy = 'zap'")
    with pytest.raises(IntentError) as ie:
        Intent.from_string("memory=lots")
    with pytest.raises(HintError) as he:
        parse_intent("memory=lots")
    for err in (ce.value, ie.value, he.value):
        assert isinstance(err, FieldError) and str(err) == f"{err.field}: {err.value!r} {err.why}"
    assert ce.value.key == ce.value.field == "daemon.straggler_policy"
