"""LangChain (`langchain-core`): a shell tool whose commands run as agentcg
tool calls, and a callback handler that marks every other tool's run as a
tool call of the session.

    from agentcg.integrations.langchain import AgentcgCallbackHandler, agentcg_shell_tool

    shell = agentcg_shell_tool(session="agent-1", intent="memory_max=4G")
    shell.invoke({"command": "pytest -q", "intent": "memory=2G,cpu=batch"})
    agent.invoke(inputs, config={"callbacks": [AgentcgCallbackHandler(session="agent-1")]})

The handler opens a tool call when a tool starts (named after the tool) and
closes it when the tool ends (exit status 0) or fails (1, also for an
error the tool handled): the session's
events and `agentcg session show` then show each tool's run and duration
beside the shell commands. The call's process is a small holder that waits
for the end, so the call accounts no work of the tool's own (that runs in
the agent's process); tools that run commands should run them through the
shell tool, whose calls the handler leaves alone. LangChain is imported when
the tool or the handler is made, not with this module.
"""
from __future__ import annotations

import asyncio
import subprocess
import threading
from typing import Any
from uuid import UUID

from agentcg.client import Client, DaemonUnavailable, ProtocolError

from ._common import DEFAULT_TIMEOUT_S, ShellRunner, ensure_session, safe_name

AGENTCG_TOOL_METADATA = "agentcg_tool_call"   # set on tools that run their own tool calls
# waits for its exit status on stdin: the tool's end (its cgroup is the call's)
_HOLDER = ["/bin/sh", "-c", "read -r status; exit ${status:-1}"]


def agentcg_shell_tool(session: str, *, name: str = "shell", intent: Any = None, session_intent: Any = None,
                       socket_path: str | None = None, cwd: str | None = None,
                       timeout_s: float | None = DEFAULT_TIMEOUT_S, config: str | None = None,
                       client: Client | None = None):
    """An AgentcgShellTool (a LangChain BaseTool) for `session`."""
    runner = ShellRunner(session, intent=intent, session_intent=session_intent, socket_path=socket_path,
                         cwd=cwd, timeout_s=timeout_s, config=config, client=client)
    return _tool_class()(name=name, runner=runner)


_TOOL_CLASS = None


def _tool_class():
    """The BaseTool subclass, defined on first use (langchain-core imported then)."""
    global _TOOL_CLASS
    if _TOOL_CLASS is not None:
        return _TOOL_CLASS
    from langchain_core.tools import BaseTool
    from pydantic import BaseModel, ConfigDict, Field

    class ShellInput(BaseModel):
        command: str = Field(description="The shell command line to run (bash -c).")
        intent: str | None = Field(None, description='What the command is expected to need, e.g. '
                                                    '"memory=2G,cpu=batch"; omit it for small commands.')
        cwd: str | None = Field(None, description="Directory to run it in.")
        timeout_s: float | None = Field(None, description="Seconds after which the command is killed.")

    class AgentcgShellTool(BaseTool):
        """Runs shell commands, each in its own resource-controlled agentcg tool call."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        name: str = "shell"
        description: str = ("Run a shell command (bash -c) in its own resource-controlled tool call. "
                            "The result has the output, the exit status, and what the kernel did "
                            "(OOM kills, throttling) with a suggestion.")
        args_schema: type[BaseModel] = ShellInput
        metadata: dict[str, Any] | None = {AGENTCG_TOOL_METADATA: True}
        runner: Any = None

        def _run(self, command: str, intent: str | None = None, cwd: str | None = None,
                 timeout_s: float | None = None, run_manager: Any = None) -> str:
            return self.runner.run(command, intent, cwd, timeout_s)

        async def _arun(self, command: str, intent: str | None = None, cwd: str | None = None,
                        timeout_s: float | None = None, run_manager: Any = None) -> str:
            return await asyncio.to_thread(self.runner.run, command, intent, cwd, timeout_s)

    _TOOL_CLASS = AgentcgShellTool
    return _TOOL_CLASS


def AgentcgCallbackHandler(session: str, *, socket_path: str | None = None, session_intent: Any = None,
                           client: Client | None = None):
    """A LangChain BaseCallbackHandler marking each tool's run as a tool call of `session`."""
    return _handler_class()(session, socket_path=socket_path, session_intent=session_intent, client=client)


_HANDLER_CLASS = None


def _handler_class():
    global _HANDLER_CLASS
    if _HANDLER_CLASS is not None:
        return _HANDLER_CLASS
    from langchain_core.callbacks import BaseCallbackHandler

    class _Handler(BaseCallbackHandler):
        raise_error = False   # a daemon that is away never breaks the agent's run

        def __init__(self, session: str, *, socket_path: str | None, session_intent: Any, client: Client | None):
            self.session_name = session
            self.session_intent = session_intent
            self.client = client or Client(socket_path=socket_path)
            self.open: dict[UUID, Any] = {}      # run_id -> the holder's CallHandle
            self.errors: list[str] = []          # what could not be marked, and why
            self._lock = threading.Lock()
            self._session = None

        def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                          metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if (metadata or {}).get(AGENTCG_TOOL_METADATA):
                return   # it runs its own tool calls
            name = safe_name(str((serialized or {}).get("name") or kwargs.get("name") or "tool"), fallback="tool")
            try:
                with self._lock:
                    if self._session is None:
                        self._session = ensure_session(self.client, self.session_name, self.session_intent)
                    handle = self._session.tool_call(name).popen(
                        _HOLDER, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    self.open[run_id] = handle
            except (DaemonUnavailable, ProtocolError, OSError) as exc:
                self.errors.append(f"{name}: {exc}")

        def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
            # a handled error ends the tool too, as a ToolMessage with status "error"
            self._close(run_id, 1 if getattr(output, "status", None) == "error" else 0)

        def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
            self._close(run_id, 1)

        def _close(self, run_id: UUID, status: int) -> None:
            with self._lock:
                handle = self.open.pop(run_id, None)
            if handle is None:
                return
            try:
                result = handle.wait(input=f"{status}\n".encode())
            except (DaemonUnavailable, ProtocolError, OSError) as exc:
                self.errors.append(f"call {handle.number}: {exc}")
                return
            if result.unaccounted:
                self.errors.append(result.unaccounted)

    _Handler.__name__ = _Handler.__qualname__ = "AgentcgCallbackHandler"
    _HANDLER_CLASS = _Handler
    return _HANDLER_CLASS
