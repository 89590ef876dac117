"""agentcg.client, the CLI and every integration module import without
loading any agent framework (each is imported when a tool is made)."""
from __future__ import annotations

import subprocess
import sys


def test_no_framework_is_imported_with_the_modules():
    code = ("import sys, agentcg.client, agentcg.cli.main, agentcg.integrations.claude_code, "
            "agentcg.integrations.openai_agents, agentcg.integrations.langchain, agentcg.integrations.mcp; "
            "print(sorted(m for m in ('agents', 'langchain_core', 'mcp', 'openai', 'pydantic') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_cli_lists_the_integration_commands():
    res = subprocess.run([sys.executable, "-m", "agentcg.cli.main", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "integrate" in res.stdout and "mcp" in res.stdout
