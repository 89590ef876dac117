"""An MCP server (the official `mcp` package) with one tool, `run_command`:
any MCP client's commands run as agentcg tool calls, each with its intent.

    agentcg mcp --session agent-1 --session-intent memory_max=16G
    python -m agentcg.integrations.mcp --session agent-1

An MCP client's server entry (e.g. Claude Desktop, Cursor, an Agents SDK
`MCPServerStdio`): {"command": "agentcg", "args": ["mcp", "--session", "agent-1"]}.

run_command(command, intent?, cwd?, timeout_s?) runs `bash -c command` as one
tool call of the session (made on first use; default $AGENTCG_SESSION, else
mcp-<pid>) and returns structured content: exit_status, output, feedback
(what the kernel did, with a suggestion), stats, limits, and the call's
number. A call agentcgd refuses (a bad intent, over the budget) is a tool
error whose text says why. Uses MCPServer (mcp >= 2) or FastMCP (mcp 1.x).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Sequence

from agentcg.client import ProtocolError

from ._common import DEFAULT_TIMEOUT_S, ShellRunner, safe_name

INSTRUCTIONS = ("run_command runs a shell command in its own resource-controlled tool call (agentcg). "
                "Declare what a heavy command needs with intent, e.g. \"memory=2G,cpu=batch\" for a test "
                "suite or \"memory_max=8G,pids_max=1024\" for a build; the result says when the kernel "
                "throttled or killed the command, with numbers and a suggestion.")


def _server_classes() -> tuple[Any, type[Exception]]:
    """(the server class, the exception a tool raises to report an error)."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
        return MCPServer, ToolError
    except ImportError:
        from mcp.server.fastmcp import FastMCP   # mcp 1.x
        from mcp.server.fastmcp.exceptions import ToolError as FastToolError
        return FastMCP, FastToolError


def build_server(runner: ShellRunner, *, name: str = "agentcg") -> Any:
    """The MCP server object with run_command bound to `runner`'s session."""
    server_class, tool_error = _server_classes()
    server = server_class(name, instructions=INSTRUCTIONS)

    @server.tool(name="run_command")
    async def run_command(command: str, intent: str | None = None, cwd: str | None = None,
                          timeout_s: float | None = None) -> dict[str, Any]:
        """Run a shell command (bash -c) in its own resource-controlled tool call.

        Args:
            command: The shell command line to run.
            intent: What the command is expected to need, e.g. "memory=2G,cpu=batch"; omit it for small commands.
            cwd: Directory to run it in.
            timeout_s: Seconds after which the command is killed.
        """
        try:
            outcome = await asyncio.to_thread(runner.outcome, command, intent, cwd, timeout_s)
        except ProtocolError as exc:
            raise tool_error(f"agentcg refused the command: {exc.message} [{exc.code}]") from None
        except (ValueError, FileNotFoundError) as exc:
            raise tool_error(f"agentcg could not run the command: {exc}") from None
        return {**outcome.to_dict(), "text": outcome.text()}

    return server


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentcg mcp",
                                 description="MCP server on stdio: run_command runs shell commands as agentcg tool calls.")
    ap.add_argument("--session", default=os.environ.get("AGENTCG_SESSION"),
                    help="Session to run in, made if missing (default $AGENTCG_SESSION, else mcp-<pid>).")
    ap.add_argument("--session-intent", default="", metavar="K=V,...", help="The session's intent, when it is made.")
    ap.add_argument("--intent", default="", metavar="K=V,...",
                    help="Intent of every call, under the matching [[auto_rules]] entry's and the client's.")
    ap.add_argument("--config", metavar="PATH", help="agentcgd's config, for its [[auto_rules]].")
    ap.add_argument("--socket", metavar="PATH", help="agentcgd's socket (default $AGENTCG_SOCKET).")
    ap.add_argument("--cwd", metavar="DIR", help="Default directory of the commands.")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help=f"Default time limit of a command (default {DEFAULT_TIMEOUT_S:.0f}).")
    return ap


def _check_intent(flag: str, text: str) -> None:
    from agentcg.core.intents import Intent, IntentError
    try:
        Intent.from_string(text)
    except IntentError as exc:
        raise ValueError(f"{flag} {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    session = safe_name(opts.session) if opts.session else f"mcp-{os.getpid()}"
    try:
        for flag, text in (("--intent", opts.intent), ("--session-intent", opts.session_intent)):
            _check_intent(flag, text)
        runner = ShellRunner(session, intent=opts.intent or None, session_intent=opts.session_intent or None,
                             socket_path=opts.socket, cwd=opts.cwd, timeout_s=opts.timeout, config=opts.config)
    except ValueError as exc:   # a bad intent or config
        print(f"agentcg mcp: {exc}", file=sys.stderr)
        return 2
    build_server(runner).run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
