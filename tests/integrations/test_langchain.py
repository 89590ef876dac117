"""The LangChain tool and callback handler with the real langchain-core
classes (tool.invoke, a tool run with callbacks), against a real agentcgd."""
from __future__ import annotations

import asyncio

import pytest
from agentcgd_harness import agentcgd  # noqa: F401  (the fixture)

pytest.importorskip("langchain_core")
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.tools import BaseTool, ToolException, tool  # noqa: E402

from agentcg.client import Client  # noqa: E402
from agentcg.integrations.langchain import AgentcgCallbackHandler, agentcg_shell_tool  # noqa: E402


def recent(socket: str, session: str) -> list[dict]:
    with Client(socket) as c:
        return c.show(session)["recent"]


@pytest.mark.kernel
def test_shell_tool_runs_each_command_as_a_tool_call(agentcgd, tmp_path):
    shell = agentcg_shell_tool(session="lc-1", socket_path=agentcgd.socket, config=str(tmp_path / "none.toml"))
    assert isinstance(shell, BaseTool)
    assert set(shell.args) == {"command", "intent", "cwd", "timeout_s"}
    text = shell.invoke({"command": "cat /proc/self/cgroup; exit 2", "intent": "memory_max=300M"})
    assert f"0::/{agentcgd.root.name}/s-lc-1/c-1\n" in text and "exit status 2" in text
    text = asyncio.run(shell.ainvoke({"command": "echo async"}))
    assert text.startswith("async\nexit status 0")
    first, second = recent(agentcgd.socket, "lc-1")
    assert first["exit_status"] == 2 and first["limits"]["memory_max_bytes"] == 300 << 20
    assert second["name"] == "echo" and second["exit_status"] == 0


@pytest.mark.kernel
def test_callback_handler_marks_other_tools_as_tool_calls(agentcgd, tmp_path):
    handler = AgentcgCallbackHandler(session="lc-2", socket_path=agentcgd.socket)
    assert isinstance(handler, BaseCallbackHandler)

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return key.upper()

    @tool
    def broken(key: str) -> str:
        """Always fails."""
        raise ToolException("no such key")

    broken.handle_tool_error = True
    shell = agentcg_shell_tool(session="lc-2", socket_path=agentcgd.socket, config=str(tmp_path / "none.toml"))
    config = {"callbacks": [handler]}
    assert lookup.invoke({"key": "a"}, config=config) == "A"
    call = {"name": "broken", "args": {"key": "b"}, "id": "call_9", "type": "tool_call"}
    assert broken.invoke(call, config=config).status == "error"   # handled: a ToolMessage
    broken.handle_tool_error = False
    with pytest.raises(ToolException):
        broken.invoke({"key": "c"}, config=config)
    assert "exit status 0" in shell.invoke({"command": "true"}, config=config)
    assert handler.errors == [] and handler.open == {}
    calls = [(r["name"], r["exit_status"]) for r in recent(agentcgd.socket, "lc-2")]
    # the shell tool's own call only once: the handler leaves it alone
    assert calls == [("lookup", 0), ("broken", 1), ("broken", 1), ("true", 0)]


def test_callback_handler_never_breaks_the_run_without_a_daemon(tmp_path):
    handler = AgentcgCallbackHandler(session="lc-3", socket_path=str(tmp_path / "none.sock"))

    @tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return key * 2

    assert lookup.invoke({"key": "x"}, config={"callbacks": [handler]}) == "xx"
    assert len(handler.errors) == 1 and "cannot reach agentcgd" in handler.errors[0]
