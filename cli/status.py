"""agentcg status: the daemon's status reply as an outline."""
from __future__ import annotations

import click

from . import output as out
from .common import Api, json_option, scalar, strip_envelope


@click.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon: root cgroup, sessions, running calls, extensions.

    \b
    Example:
      agentcg status --json
    """
    with Api(ctx) as client:
        st = strip_envelope(client.status())
    if as_json:
        click.echo(out.to_json(st))
        return
    for line in _tree_lines(st):
        click.echo(line)


def _tree_lines(data: dict, indent: str = "") -> list[str]:
    """Nested dicts as an indented outline; lists of scalars on one line;
    lists of records one per line (their own "line" text where they carry
    one, as the policy's last actions do)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.extend(_tree_lines(value, indent + "  "))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            lines.extend(f"{indent}  - {v['line'] if isinstance(v.get('line'), str) else scalar(key, v)}"
                         for v in value)
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: {', '.join(scalar(key, v) for v in value) or '-'}")
        else:
            lines.append(f"{indent}{key}: {scalar(key, value)}")
    return lines
