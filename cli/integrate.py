"""`agentcg integrate ...`: wire agentcg into an agent framework's settings,
and `agentcg mcp`: the MCP server on stdio. The frameworks' own code lives in
agentcg.integrations (docs/integrations.md)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from agentcg.integrations import claude_code


@click.group()
def integrate() -> None:
    """Wire agentcg into an agent framework (docs/integrations.md)."""


@integrate.command("claude-code")
@click.option("--settings", "settings_path", metavar="PATH", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(".claude/settings.json"), show_default=True,
              help="Claude Code settings file to merge the hooks into (~/.claude/settings.json for every project).")
@click.option("--print", "print_only", is_flag=True, help="Print the merged settings instead of writing them.")
@click.option("--intent", metavar="K=V,...", default="", help="Intent of every Bash call, under the matching [[auto_rules]] entry's.")
@click.option("--session-intent", metavar="K=V,...", default="", help="Intent of each Claude Code session's agentcg session.")
@click.option("--config", "config_path", metavar="PATH", help="agentcgd config whose [[auto_rules]] pick each call's intent.")
@click.option("--auto-approve", is_flag=True,
              help="Approve the rewritten commands from the hook (permissionDecision allow; deny rules still "
                   "apply). Default: Claude Code asks as usual.")
@click.option("--report", type=click.Choice(["feedback", "always"]), default="feedback", show_default=True,
              help="After each call tell the model what the kernel did (feedback), or every call's numbers (always).")
def claude_code_cmd(settings_path: Path, print_only: bool, intent: str, session_intent: str,
                    config_path: str | None, auto_approve: bool, report: str) -> None:
    """Run every Bash tool call of Claude Code as an agentcg tool call.

    \b
    Adds a PreToolUse hook (rewrites the command to `agentcg run --session
    cc-<session id> ... -- bash -c '<command>'`) and a PostToolUse hook (tells
    the model about OOM kills, throttling and memory peaks) for the Bash
    tool to the settings file; other settings and hooks are kept, and an
    earlier agentcg hook is replaced.

    \b
    Examples:
      agentcg integrate claude-code
      agentcg integrate claude-code --settings ~/.claude/settings.json --intent memory_max=8G
      agentcg integrate claude-code --print
    """
    options = _hook_options(intent, session_intent, config_path, auto_approve, report)
    problem = claude_code.check_options(claude_code.parser().parse_args(options))
    if problem:
        raise click.UsageError(problem)
    existing = _read_settings(settings_path)
    try:
        merged = claude_code.merge_settings(existing, claude_code.settings_snippet(options))
    except ValueError as exc:
        raise click.ClickException(f"{settings_path}: {exc}") from None
    text = json.dumps(merged, indent=2) + "\n"
    if print_only:
        click.echo(text, nl=False)
        return
    _write_atomically(settings_path, text)
    click.echo(f"agentcg hooks for Bash written to {settings_path} (PreToolUse, PostToolUse)")


def _hook_options(intent: str, session_intent: str, config_path: str | None, auto_approve: bool,
                  report: str) -> list[str]:
    options: list[str] = []
    if config_path:
        options += ["--config", os.path.abspath(config_path)]
    if intent:
        options += ["--intent", intent]
    if session_intent:
        options += ["--session-intent", session_intent]
    if auto_approve:
        options += ["--decision", "allow"]
    if report != "feedback":
        options += ["--report", report]
    return options


def _read_settings(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.ClickException(f"{path} is not JSON ({exc}); nothing was changed") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path} is not a JSON object; nothing was changed")
    return data


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file in one rename, so that Claude Code never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@click.command("mcp", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def mcp_cmd(ctx: click.Context) -> None:
    """Serve agentcg's run_command tool to MCP clients on stdio.

    \b
    Options are those of `python -m agentcg.integrations.mcp --help`
    (--session, --session-intent, --config). Needs the `mcp` package
    (pip install 'agentcg[integrations]').

    \b
    Example (an MCP client's server entry):
      {"command": "agentcg", "args": ["mcp", "--session", "agent-1"]}
    """
    try:
        from agentcg.integrations import mcp as mcp_integration
    except ImportError as exc:
        raise click.ClickException(f"{exc}; install it with: pip install 'agentcg[integrations]'") from None
    try:
        code = mcp_integration.main(list(ctx.args))
    except ImportError as exc:
        raise click.ClickException(f"{exc}; install it with: pip install 'agentcg[integrations]'") from None
    sys.exit(code)
