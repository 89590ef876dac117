"""The [metrics] table of agentcgd's configuration: the Prometheus endpoint.

    [metrics]
    listen = "127.0.0.1:9464"   # host:port; "" (the default) = no endpoint
    max_commands = 64           # command classes with series of their own

Off by default. The endpoint needs the `metrics` extra (prometheus_client:
`pip install 'agentcg[metrics]'`); without it the daemon says so in its log
and in `agentcg status` and runs on. Errors name the field
(`metrics.listen: '9464' is not host:port`). See docs/metrics.md.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

MAX_COMMANDS_LIMIT = 1000
_KEYS = ("listen", "max_commands")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""          # "host:port"; "" = off
    max_commands: int = 64    # least recently seen command classes beyond this share "other"

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def _err(where: str, value: Any, why: str) -> Exception:
    from agentcg.core.config import ConfigError
    return ConfigError(where, value, why)


def split_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:9464" -> ("127.0.0.1", 9464); "[::1]:9464" -> ("::1", 9464).
    Raises ValueError with the reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("is not host:port (e.g. 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not an IP address or localhost") from None
    n = int(port)
    if not 0 <= n <= 65535:
        raise ValueError(f"port {n} is not in 0..65535")
    return host, n


def parse_metrics(tbl: Any) -> MetricsConfig:
    if not isinstance(tbl, Mapping):
        raise _err("metrics", tbl, "is not a table")
    for k in tbl:
        if k not in _KEYS:
            raise _err(f"metrics.{k}", tbl[k], f"is not a known key (known: {', '.join(_KEYS)})")
    listen = tbl.get("listen", "")
    if not isinstance(listen, str):
        raise _err("metrics.listen", listen, "is not a string")
    if listen:
        try:
            split_listen(listen)
        except ValueError as exc:
            raise _err("metrics.listen", listen, str(exc)) from None
    n = tbl.get("max_commands", MetricsConfig.max_commands)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_COMMANDS_LIMIT:
        raise _err("metrics.max_commands", n, f"is not an integer in 1..{MAX_COMMANDS_LIMIT}")
    return MetricsConfig(listen=listen, max_commands=n)
