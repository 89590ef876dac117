"""systemd/agentcgd.service: the settings the daemon relies on, and systemd's own verdict."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "agentcgd.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, repeated keys accumulate, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"line {lineno}: not a section header or Key=Value: {raw!r}")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def one(unit, key, section="Service"):
    values = unit[section].get(key)
    assert values, f"{key}= missing in [{section}]"
    return values[-1]


def test_notify_type_and_watchdog(unit):
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec").rstrip("s").isdigit()
    assert one(unit, "Restart") == "on-failure"


def test_delegation_keeps_tool_calls_alive_across_restarts(unit):
    assert one(unit, "Delegate") == "yes"
    # control-group or mixed would kill every tool call in the delegated subtree
    assert one(unit, "KillMode") == "process"
    assert one(unit, "MemoryLow") == "64M"


def test_runtime_directory_survives_restart(unit):
    assert one(unit, "RuntimeDirectory") == "agentcg"
    assert one(unit, "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, "ExecStart").endswith("/agentcgd")


def test_hardening_leaves_cgroupfs_writable(unit):
    assert one(unit, "ProtectSystem") == "strict"
    rw = " ".join(unit["Service"]["ReadWritePaths"]).split()
    for path in ("/sys/fs/cgroup", "/run/agentcg", "/var/log/agentcg"):
        assert path in rw
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "PrivateTmp") == "yes"
    # these would make /sys/fs/cgroup read-only
    assert unit["Service"].get("ProtectControlGroups", ["no"])[-1] == "no"
    assert unit["Service"].get("ProtectKernelTunables", ["no"])[-1] == "no"
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_NETLINK"}
    caps = set(one(unit, "CapabilityBoundingSet").split())
    for cap in ("CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_KILL",
                "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE", "CAP_NET_ADMIN"):
        assert cap in caps


def test_installable(unit):
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_parser_rejects_garbage():
    with pytest.raises(ValueError, match="line 2"):
        parse_unit("[Service]\nnot a key value\n")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd parses every directive (unknown keys only warn, so warnings fail here)."""
    daemon_bin = Path(sys.executable).with_name("agentcgd")
    if not daemon_bin.exists():
        daemon_bin = Path("/bin/true")  # verify checks ExecStart= is executable
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/agentcgd", f"ExecStart={daemon_bin}")
    copy = tmp_path / "agentcgd.service"
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    relevant = [line for line in out.splitlines() if "agentcgd.service" in line]
    assert not relevant, "\n".join(relevant)
