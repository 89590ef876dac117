"""The MCP server over stdio, driven by the `mcp` package's own client
(stdio_client + ClientSession), against a real agentcgd."""
from __future__ import annotations

import subprocess
import sys

import anyio
import pytest
from agentcgd_harness import agentcgd  # noqa: F401  (the fixture)

pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402

from agentcg.client import Client  # noqa: E402


def server_params(daemon, *args: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "agentcg.cli.main", "mcp", *args],
                                 env={"AGENTCG_SOCKET": daemon.socket, "AGENTCG_CONFIG": daemon.env["AGENTCG_CONFIG"]})


async def _calls(params: StdioServerParameters, calls: list[dict]) -> tuple[list, list]:
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            results = [await session.call_tool("run_command", args) for args in calls]
    return tools, results


@pytest.mark.kernel
def test_run_command_over_stdio_runs_tool_calls_with_intents(agentcgd, tmp_path):
    params = server_params(agentcgd, "--session", "mcp-a", "--session-intent", "memory_max=1G")
    tools, (first, second, refused) = anyio.run(_calls, params, [
        {"command": "cat /proc/self/cgroup; pwd; exit 7", "intent": "memory_max=200M", "cwd": str(tmp_path)},
        {"command": "sleep 60 >/dev/null 2>&1 & echo bg"},
        {"command": "true", "intent": "memory_max=12X"},
    ])
    (tool,) = tools
    assert tool.name == "run_command"
    assert set(tool.input_schema["properties"]) == {"command", "intent", "cwd", "timeout_s"}
    assert tool.input_schema["required"] == ["command"]
    out = first.structured_content
    assert not first.is_error
    assert out["exit_status"] == 7 and out["session"] == "mcp-a" and out["call"] == 1
    assert f"0::/{agentcgd.root.name}/s-mcp-a/c-1\n" in out["output"]
    assert out["output"].endswith(f"\n{tmp_path}\n")
    assert out["limits"]["memory_max_bytes"] == 200 << 20
    assert "exit status 7" in first.content[0].text
    out = second.structured_content
    assert out["output"] == "bg\n" and out["feedback"][0]["kind"] == "stragglers_killed"
    assert refused.is_error and "memory_max: '12X' is not a size" in refused.content[0].text
    with Client(agentcgd.socket) as c:
        info = c.show("mcp-a")
    assert info["limits"]["memory_max_bytes"] == 1 << 30
    assert [r["exit_status"] for r in info["recent"]] == [7, 0]


def test_bad_options_are_refused_before_serving():
    res = subprocess.run([sys.executable, "-m", "agentcg.integrations.mcp", "--intent", "cpu=fast"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 2 and "--intent cpu: 'fast'" in res.stderr
