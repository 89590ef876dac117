"""The Claude Code hooks as Claude Code runs them: a subprocess fed the
documented hook JSON on stdin (Hooks reference, code.claude.com/docs/en/hooks),
its JSON answer read from stdout; and the rewritten command run through a
real agentcgd."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from agentcgd_harness import agentcgd  # noqa: F401  (the fixture)

HOOK = [sys.executable, "-m", "agentcg.integrations.claude_code"]
AGENTCG = [sys.executable, "-m", "agentcg.cli.main"]
SESSION_ID = "4f1c2a9e-7b3d-4e55-9a0c-1d2e3f405162"


def payload(event: str, command: str, *, tool_use_id: str = "toolu_01A2b3C4d5E6f7G8h9", **extra) -> dict:
    """A hook input as documented: common fields plus the tool's."""
    data = {"session_id": SESSION_ID, "transcript_path": "/tmp/transcript.jsonl", "cwd": "/tmp",
            "permission_mode": "default", "hook_event_name": event, "tool_name": "Bash",
            "tool_input": {"command": command, "description": "Run the tests", "timeout": 120000},
            "tool_use_id": tool_use_id}
    data.update(extra)
    return data


def hook(data, *args: str, env=None) -> subprocess.CompletedProcess:
    text = data if isinstance(data, str) else json.dumps(data)
    return subprocess.run(HOOK + list(args), input=text, capture_output=True, text=True, env=env, timeout=60)


def answer(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --- without a daemon -------------------------------------------------------------

def test_other_tools_are_left_alone(tmp_path):
    data = payload("PreToolUse", "ls")
    data.update(tool_name="Read", tool_input={"file_path": "/etc/hostname"})
    res = hook(data, env={"AGENTCG_SOCKET": str(tmp_path / "none.sock"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout == ""


def test_without_agentcgd_the_command_runs_unchanged_and_the_model_is_told(tmp_path):
    res = hook(payload("PreToolUse", "pytest -q"), env={"AGENTCG_SOCKET": str(tmp_path / "none.sock"),
                                                        "AGENTCG_CONFIG": str(tmp_path / "no.toml")})
    out = answer(res)["hookSpecificOutput"]
    assert out["hookEventName"] == "PreToolUse"
    assert "updatedInput" not in out and "permissionDecision" not in out
    assert "not reachable" in out["additionalContext"]


def test_bad_input_is_a_non_blocking_error():
    res = hook("not json")
    assert res.returncode == 1 and res.stdout == ""
    assert "not the hook's JSON" in res.stderr
    res = hook(payload("PreToolUse", "ls"), "--intent", "memory=12X")
    assert res.returncode == 1 and "--intent" in res.stderr


def test_integrate_merges_the_hooks_into_settings(tmp_path):
    settings = tmp_path / ".claude" / "settings.json"
    settings.parent.mkdir()
    other = {"matcher": "Write", "hooks": [{"type": "command", "command": "lint.sh"}]}
    settings.write_text(json.dumps({"model": "opus", "hooks": {"PreToolUse": [other]}}))
    for _ in range(2):   # a second run replaces the first's hooks
        res = subprocess.run(AGENTCG + ["integrate", "claude-code", "--settings", str(settings),
                                        "--intent", "memory_max=8G"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    data = json.loads(settings.read_text())
    assert data["model"] == "opus"
    pre, post = data["hooks"]["PreToolUse"], data["hooks"]["PostToolUse"]
    assert pre[0] == other and len(pre) == 2 and len(post) == 1
    for entry in (pre[1], post[0]):
        assert entry["matcher"] == "Bash"
        (h,) = entry["hooks"]
        assert h["type"] == "command"
        assert shlex.split(h["command"])[1:] == ["-m", "agentcg.integrations.claude_code", "--intent", "memory_max=8G"]


def test_integrate_refuses_a_settings_file_that_is_not_json(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text("{oops")
    res = subprocess.run(AGENTCG + ["integrate", "claude-code", "--settings", str(settings)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "is not JSON" in res.stderr
    assert settings.read_text() == "{oops"


# --- with a real agentcgd --------------------------------------------------------------



def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agentcg.toml"
    cfg.write_text('[[auto_rules]]\ncommand = "pytest*"\nintent = { memory_max = "512M", cpu = "batch" }\n'
                   '[[auto_rules]]\nregex = "make .*-j"\nintent = { pids_max = 512 }\nname = "parallel-make"\n')
    return cfg


@pytest.mark.kernel
def test_pre_tool_use_rewrites_the_command_with_the_rule_intent(agentcgd, tmp_path):
    res = hook(payload("PreToolUse", "FOO=1 pytest -q 'tests/a b.py'"), "--config", str(_config(tmp_path)),
               "--session-intent", "memory_max=2G", env=agentcgd.env)
    out = answer(res)["hookSpecificOutput"]
    assert out["hookEventName"] == "PreToolUse"
    assert out["permissionDecision"] == "ask"
    assert "auto rule 'pytest*'" in out["permissionDecisionReason"]
    new = out["updatedInput"]
    # the whole input is replaced: every other field is kept
    assert new["description"] == "Run the tests" and new["timeout"] == 120000
    words = shlex.split(new["command"])
    i = words.index("run")
    assert words[i + 1:i + 3] == ["--session", f"cc-{SESSION_ID}"]
    assert words[words.index("--intent") + 1] == "memory_max=512M,cpu=batch"
    assert words[words.index("--") + 1:] == ["/bin/bash", "-c", "FOO=1 pytest -q 'tests/a b.py'"]
    # the session exists, with its intent
    show = subprocess.run(AGENTCG + ["session", "show", f"cc-{SESSION_ID}", "--json"], env=agentcgd.env,
                          capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["limits"]["memory_max_bytes"] == 2 << 30


@pytest.mark.kernel
def test_regex_rules_and_permission_modes(agentcgd, tmp_path):
    cfg = str(_config(tmp_path))
    out = answer(hook(payload("PreToolUse", "cd src && make all -j8"), "--config", cfg,
                      env=agentcgd.env))["hookSpecificOutput"]
    assert "pids_max=512" in out["updatedInput"]["command"]
    out = answer(hook(payload("PreToolUse", "ls", permission_mode="bypassPermissions"), "--config", cfg,
                      env=agentcgd.env))["hookSpecificOutput"]
    assert out["permissionDecision"] == "allow" and "--intent" not in out["updatedInput"]["command"]
    # an already wrapped command is not wrapped twice
    res = hook(payload("PreToolUse", out["updatedInput"]["command"]), "--config", cfg, env=agentcgd.env)
    assert res.returncode == 0 and res.stdout == ""


@pytest.mark.kernel
def test_the_rewritten_command_runs_as_a_tool_call_and_post_tool_use_reports_it(agentcgd, tmp_path):
    """End to end: what Claude Code's Bash tool would run, through agentcgd;
    then PostToolUse feeds the call's result back to the model."""
    command = "cat /proc/self/cgroup; sleep 60 >/dev/null 2>&1 & exit 3"
    pre = answer(hook(payload("PreToolUse", command), "--config", str(_config(tmp_path)), env=agentcgd.env))
    wrapped = pre["hookSpecificOutput"]["updatedInput"]["command"]
    ran = subprocess.run(["/bin/bash", "-c", wrapped], env=agentcgd.env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 3, ran.stderr
    assert f"0::/{agentcgd.root.name}/s-cc-{SESSION_ID}/c-1\n" in ran.stdout
    # the sleep outlived the call: agentcgd killed it and says so
    assert "agentcg:" in ran.stderr
    post_in = payload("PostToolUse", command, tool_response={"stdout": ran.stdout, "stderr": ran.stderr,
                                                             "interrupted": False, "isImage": False})
    out = answer(hook(post_in, env=agentcgd.env))["hookSpecificOutput"]
    assert out["hookEventName"] == "PostToolUse"
    ctx = out["additionalContext"]
    assert ctx.startswith("agentcg: call 1 (cat-") and "exit 3" in ctx
    assert "Leftover processes: 1 process" in ctx
    # PostToolUse given the rewritten input finds the same call
    post_in["tool_input"]["command"] = wrapped
    assert answer(hook(post_in, env=agentcgd.env))["hookSpecificOutput"]["additionalContext"] == ctx
    # a quiet call says nothing by default, its numbers with --report always
    pre = answer(hook(payload("PreToolUse", "true", tool_use_id="toolu_quiet1"), env=agentcgd.env))
    assert subprocess.run(["/bin/bash", "-c", pre["hookSpecificOutput"]["updatedInput"]["command"]],
                          env=agentcgd.env).returncode == 0
    quiet = payload("PostToolUse", "true", tool_use_id="toolu_quiet1", tool_response={"stdout": "", "stderr": ""})
    res = hook(quiet, env=agentcgd.env)
    assert res.returncode == 0 and res.stdout == ""
    ctx = answer(hook(quiet, "--report", "always", env=agentcgd.env))["hookSpecificOutput"]["additionalContext"]
    assert ctx.startswith("agentcg: call 2 (true-") and "exit 0" in ctx and "wall" in ctx
