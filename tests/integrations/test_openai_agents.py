"""The OpenAI Agents SDK tool, invoked through the SDK's own machinery
(FunctionTool.on_invoke_tool with a real ToolContext), against a real
agentcgd; no model is called."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from agentcgd_harness import agentcgd  # noqa: F401  (the fixture)

agents = pytest.importorskip("agents")
from agents import FunctionTool  # noqa: E402
from agents.tool_context import ToolContext  # noqa: E402

from agentcg.client import Client  # noqa: E402
from agentcg.integrations.openai_agents import agentcg_shell_tool, openai_client  # noqa: E402


def invoke(tool: FunctionTool, **arguments) -> str:
    args = json.dumps(arguments)
    ctx = ToolContext(context=None, tool_name=tool.name, tool_call_id="call_1", tool_arguments=args)
    return asyncio.run(tool.on_invoke_tool(ctx, args))


def test_the_tool_is_a_function_tool_with_the_documented_parameters():
    tool = agentcg_shell_tool(session="oa", socket_path="/nonexistent.sock")
    assert isinstance(tool, FunctionTool) and tool.name == "shell"
    props = tool.params_json_schema["properties"]
    assert set(props) == {"command", "intent", "cwd", "timeout_s"}
    assert "memory=2G" in props["intent"]["description"]


@pytest.mark.kernel
def test_commands_run_as_tool_calls_with_status_output_and_intent(agentcgd, tmp_path):
    tool = agentcg_shell_tool(session="oa-1", intent="memory_max=1G", socket_path=agentcgd.socket)
    text = invoke(tool, command="cat /proc/self/cgroup; pwd; echo oops >&2; exit 4", intent="memory=256M",
                  cwd=str(tmp_path))
    assert f"0::/{agentcgd.root.name}/s-oa-1/c-1\n" in text
    assert f"\n{tmp_path}\n" in text and "oops" in text
    assert "exit status 4" in text
    with Client(agentcgd.socket) as c:
        (done,) = c.show("oa-1")["recent"]
    assert done["exit_status"] == 4 and done["name"] == "cat"
    assert done["limits"]["memory_max_bytes"] == 1 << 30 and done["limits"]["memory_high_bytes"] == 256 << 20


@pytest.mark.kernel
def test_feedback_and_refusals_reach_the_model(agentcgd):
    tool = agentcg_shell_tool(session="oa-2", socket_path=agentcgd.socket)
    text = invoke(tool, command="sleep 60 >/dev/null 2>&1 & echo started")
    assert "started\nexit status 0\nagentcg: call 1 (sleep)" in text
    assert "Leftover processes: 1 process" in text
    text = invoke(tool, command="true", intent="memory=12X")
    assert text == "agentcg could not run the command: memory: '12X' is not a size (e.g. 512M, 2G)"
    text = invoke(tool, command="sleep 30", timeout_s=0.5)
    assert "[timed out: killed after 0.5 s]" in text and "exit status 124" in text


def test_openai_client_sends_the_session_header():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "hi"}}]})

    async def ask():
        client = openai_client("agent-7", base_url="http://127.0.0.1:9/v1", api_key="-",
                               default_headers={"X-Other": "1"},
                               http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
        model = agents.OpenAIChatCompletionsModel(model="m", openai_client=client)
        return await model._client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])

    reply = asyncio.run(ask())
    assert reply.choices[0].message.content == "hi"
    assert seen[0]["x-agentcg-session"] == "agent-7" and seen[0]["x-other"] == "1"
