from __future__ import annotations

import pytest

from agentcg.core.rules_match import RuleError, match_command, parse_rules, program_name


def test_glob_on_program_name_and_regex_on_cmdline_first_match_wins():
    rules = parse_rules([
        {"regex": r"^npm (test|run build)", "intent": {"network": "none"}, "name": "npm"},
        {"command": "py*", "intent": {"cpu": "batch"}},
        {"command": "*", "intent": {"cpu": "latency"}},
    ])
    m = match_command(rules, "/usr/bin/npm", ("npm", "run", "build"))
    assert m.rule == "npm" and m.intent == {"network": "none"} and m.cmdline == "npm run build"
    m = match_command(rules, "/usr/bin/python3.11", ("/usr/bin/python3.11", "-m", "pytest"))
    assert m.rule == "py*" and m.program == "python3.11"
    assert match_command(rules, "/bin/ls", ("ls",)).rule == "*"
    assert match_command(parse_rules([]), "/bin/ls", ("ls",)) is None


def test_program_name_falls_back_to_the_path():
    assert program_name("/usr/bin/env", ()) == "env"
    assert program_name("/x/y", ("./build.sh", "a")) == "build.sh"


@pytest.mark.parametrize("raw,msg", [
    ([{"intent": {}}], r"auto_rules\[0\]: needs exactly one"),
    ([{"command": "a", "regex": "b"}], "exactly one"),
    ([{"regex": "("}], r"auto_rules\[0\].regex: '\(' is not a valid"),
    ([{"command": ""}], "command: expected a non-empty glob"),
    ([{"command": "a", "intent": 3}], "intent: expected a table"),
    ([{"command": "a", "colour": 1}], r"unknown field\(s\) \['colour'\]"),
    ("pytest", "expected a list"),
])
def test_bad_rules_name_field_and_value(raw, msg):
    with pytest.raises(RuleError, match=msg):
        parse_rules(raw)
