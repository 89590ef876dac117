"""agentcg: the command line for agentcgd (a thin layer over agentcg.client).

    agentcg status
    agentcg session create agent-1 --intent memory=8G,priority=7
    agentcg run --session agent-1 --intent memory=2G,cpu=batch -- pytest -q
    agentcg events --follow --session agent-1
    agentcg top

Each command lives in a module of its own; this one holds the group, its
global options, and the registration of the commands.
"""
from __future__ import annotations

import click

from agentcg import protocol as p

from .events import events
from .run import run
from .session import session
from .status import _tree_lines, status  # noqa: F401  (_tree_lines: the status outline, used by tests)
from .top import top
from .integrate import integrate, mcp_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_", metavar="PATH", envvar="AGENTCG_SOCKET",
              help=f"agentcgd's socket (env AGENTCG_SOCKET; default {p.DEFAULT_SOCKET}).")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable JSON from the command that follows (the same as its own --json).")
@click.pass_context
def cli(ctx: click.Context, socket_: str | None, as_json: bool) -> None:
    """Run AI agents' tool calls in their own cgroups, under agentcgd.

    \b
    Every tool call gets a fresh cgroup below its session's, with the limits
    its intent asks for (within the session's budget); when the kernel steps
    in (throttling, OOM kill, killed stragglers) you are told in plain words.

    \b
    Examples:
      agentcg status
      agentcg --json status
      agentcg session create agent-1 --intent memory=8G
      agentcg run --session agent-1 --intent memory=2G,cpu=batch -- pytest -q
      agentcg events --follow
      agentcg top
    """
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket_
    ctx.obj["json"] = as_json


cli.add_command(status)
cli.add_command(session)
cli.add_command(run)
cli.add_command(events)
cli.add_command(top)
cli.add_command(integrate)
cli.add_command(mcp_cmd)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="agentcg")


if __name__ == "__main__":
    main()
