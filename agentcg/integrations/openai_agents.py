"""OpenAI Agents SDK (`openai-agents`): a shell tool whose commands run as
agentcg tool calls, and an OpenAI client that names the agent's session.

    from agents import Agent
    from agentcg.integrations.openai_agents import agentcg_shell_tool, openai_client

    agent = Agent(name="coder", tools=[agentcg_shell_tool(session="agent-1", intent="memory_max=4G")])
    client = openai_client("agent-1", base_url="http://127.0.0.1:8000/v1", api_key="-")

The tool is a `FunctionTool` made with the SDK's `function_tool`; the model
calls it with `command` (run by bash -c) and optionally `intent` (e.g.
"memory=2G,cpu=batch"), `cwd` and `timeout_s`. Its result is text: the
output, the exit status, and agentcg's account when the kernel intervened
(an OOM kill with the peak and the limit, throttling, leftover processes).
The SDK is imported when a tool or client is made, not with this module.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

from agentcg.client import Client

from ._common import DEFAULT_TIMEOUT_S, ShellRunner

SESSION_HEADER = "X-Agentcg-Session"


def agentcg_shell_tool(session: str, *, name: str = "shell", intent: Any = None, session_intent: Any = None,
                       socket_path: str | None = None, cwd: str | None = None,
                       timeout_s: float | None = DEFAULT_TIMEOUT_S, config: str | None = None,
                       client: Client | None = None):
    """A FunctionTool that runs shell commands as tool calls of `session`
    (made if it does not exist). `intent` applies to every call, under the
    matching [[auto_rules]] entry of `config` and the model's own intent."""
    from agents import function_tool

    runner = ShellRunner(session, intent=intent, session_intent=session_intent, socket_path=socket_path,
                         cwd=cwd, timeout_s=timeout_s, config=config, client=client)

    async def run_command(command: str, intent: str | None = None, cwd: str | None = None,
                          timeout_s: float | None = None) -> str:
        """Run a shell command (bash -c) in its own resource-controlled tool call.

        Args:
            command: The shell command line to run.
            intent: What the command is expected to need, e.g. "memory=2G,cpu=batch" or
                "memory_max=8G,pids_max=512"; omit it for small commands.
            cwd: Directory to run it in.
            timeout_s: Seconds after which the command is killed.
        """
        return await asyncio.to_thread(runner.run, command, intent, cwd, timeout_s)

    tool = function_tool(run_command, name_override=name)
    tool.agentcg_runner = runner   # the session and client, for the caller
    return tool


def session_headers(session: str) -> dict[str, str]:
    """The header that ties an agent's model turns to its session on the
    agentcg inference worker (docs/protocol.md, the worker's API)."""
    return {SESSION_HEADER: session}


def openai_client(session: str, *, default_headers: Mapping[str, str] | None = None, **kwargs: Any):
    """An `openai.AsyncOpenAI` (what the Agents SDK's models take, e.g.
    `OpenAIChatCompletionsModel(model=..., openai_client=...)` or
    `agents.set_default_openai_client`) that sends X-Agentcg-Session."""
    from openai import AsyncOpenAI
    return AsyncOpenAI(default_headers={**(default_headers or {}), **session_headers(session)}, **kwargs)
