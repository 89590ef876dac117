"""Parsing AGENT_RESOURCE_HINT, --intent, names and shell argument lists."""
from __future__ import annotations

import pytest

from agentcg.cli import hintexec
from agentcg.cli.hints import (HintError, call_name_for, check_session_name, parse_hint, parse_intent,
                               split_session_intent)


def test_hint_with_name():
    hint = parse_hint("memory=2G,cpu=batch,name=tests")
    assert hint.name == "tests"
    assert hint.intent.memory_bytes == 2 << 30
    assert hint.intent.cpu_class == "batch"


def test_empty_hint_is_no_intent():
    assert parse_hint(None).intent.to_dict() == {}
    assert parse_hint("  ").name is None


@pytest.mark.parametrize("text, field", [
    ("memory=2X", "memory"),
    ("memroy=2G", "memroy"),
    ("cpu=fastest", "cpu"),
    ("pids_max=-1", "pids_max"),
    ("name=bad/name", "name"),
    ("memory", "intent"),
])
def test_bad_hint_names_the_field(text, field):
    with pytest.raises(HintError) as err:
        parse_hint(text)
    assert f"AGENT_RESOURCE_HINT {field}" in str(err.value)


def test_intent_errors_name_the_option():
    with pytest.raises(HintError, match=r"--intent memory_max: '0'"):
        parse_intent("memory_max=0")


def test_priority_goes_to_the_session():
    session, call = split_session_intent(parse_intent("memory=1G,priority=7"))
    assert session.to_dict() == {"priority": 7}
    assert call.to_dict() == {"memory": 1 << 30}


def test_call_names():
    assert call_name_for(["pytest", "-q"]) == "pytest"
    assert call_name_for(["/usr/bin/make", "-j4"]) == "make"
    assert call_name_for(["bash", "-c", "FOO=1 pytest -q"]) == "pytest"
    assert call_name_for(["bash", "-c", "'weird'"]) == "weird"
    assert call_name_for(["+++"]) == "call"


def test_session_names():
    assert check_session_name("agent-1.x_y") == "agent-1.x_y"
    for bad in ("", "-lead", "a" * 64, "a b"):
        with pytest.raises(HintError, match="session"):
            check_session_name(bad)


def test_shell_argument_forms():
    assert hintexec.has_command_string(["-c", "ls"])
    assert hintexec.has_command_string(["-lc", "ls"])
    assert hintexec.has_command_string(["-e", "-c", "ls"])
    assert hintexec.has_command_string(["--login", "-c", "ls"])
    assert not hintexec.has_command_string([])
    assert not hintexec.has_command_string(["script.sh", "-c"])
    assert hintexec.command_text(["-lc", "pytest -q", "arg0"]) == "pytest -q"


def test_bad_hint_does_not_run_the_command(monkeypatch, tmp_path, capsys):
    flag = tmp_path / "ran"
    monkeypatch.setenv("AGENT_RESOURCE_HINT", "memory=lots")
    assert hintexec.main(["-c", f"touch {flag}"]) == 2
    assert not flag.exists()
    assert "AGENT_RESOURCE_HINT memory: 'lots'" in capsys.readouterr().err
