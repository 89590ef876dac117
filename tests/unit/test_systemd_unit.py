"""systemd/agentcgd.service passes systemd's own checker with no warning (an
unknown or misspelt directive is only a warning to systemd, and would be
silently ignored at run time)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "agentcgd.service"


def _verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # ExecStart must name an executable that exists here: the installed console script
    exe = Path(sys.executable).with_name("agentcgd")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    lines = [f"ExecStart={exe}" if ln.startswith("ExecStart=") else ln for ln in text.splitlines()]
    unit = tmp_path / "agentcgd.service"
    unit.write_text("\n".join(lines) + "\n")
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_unit_verifies_clean(tmp_path):
    r = _verify(UNIT.read_text(), tmp_path)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_checker_catches_a_misspelt_directive(tmp_path):
    """The check above would notice a broken unit: the same unit with one
    directive misspelt is reported."""
    r = _verify(UNIT.read_text().replace("Delegate=yes", "Delegat=yes"), tmp_path)
    assert "Delegat" in r.stdout + r.stderr


def test_unit_delegates_and_keeps_agents_on_restart():
    """The settings the daemon's design depends on (README, "Restart safety")."""
    keys = {}
    for ln in UNIT.read_text().splitlines():
        if "=" in ln and not ln.startswith("#"):
            k, _, v = ln.partition("=")
            keys.setdefault(k.strip(), v.strip())
    assert keys["Delegate"] == "yes" and keys["KillMode"] == "process" and keys["Type"] == "notify"
    assert keys["RuntimeDirectoryPreserve"] == "yes"
