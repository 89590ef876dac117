"""Integrations of agentcg with agent frameworks, one module each.

- `claude_code`: PreToolUse/PostToolUse command hooks that run every Bash
  tool call of Claude Code as an agentcg tool call.
- `openai_agents`: a function tool for the OpenAI Agents SDK, and an OpenAI
  client that names the agent's session to the inference worker.
- `langchain`: a LangChain `BaseTool` for shell commands and a callback
  handler that marks the boundaries of every other tool.
- `mcp`: an MCP server (stdio) with a `run_command` tool.

Each module imports its framework lazily, so `agentcg.client` and this
package import without any of them installed (`pip install agentcg[integrations]`).
The shared part (sessions, running a shell command as a tool call, the text
the model reads) is in `_common`.
"""
