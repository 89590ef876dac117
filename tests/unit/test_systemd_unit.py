"""systemd/agentcgd.service and systemd/agentcg-tree.service pass systemd's
own checker with no warning (an unknown or misspelt directive is only a
warning to systemd, and would be silently ignored at run time)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = UNIT_DIR / "agentcgd.service"
TREE_UNIT = UNIT_DIR / "agentcg-tree.service"


def _verify(text: str, tmp_path: Path, tree_text: str | None = None,
            check: str = "agentcgd.service") -> subprocess.CompletedProcess:
    """systemd-analyze verify of `check`, with both units in one directory
    (agentcgd.service's BindsTo= needs the tree unit to load)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # ExecStart must name an executable that exists here: the installed console script
    exe = Path(sys.executable).with_name("agentcgd")
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    lines = [f"ExecStart={exe}" if ln.startswith("ExecStart=") else ln for ln in text.splitlines()]
    (tmp_path / "agentcgd.service").write_text("\n".join(lines) + "\n")
    (tmp_path / "agentcg-tree.service").write_text(TREE_UNIT.read_text() if tree_text is None else tree_text)
    return subprocess.run(["systemd-analyze", "verify", str(tmp_path / check)],
                          capture_output=True, text=True, timeout=60)


def _keys(path: Path) -> dict[str, str]:
    keys: dict[str, str] = {}
    for ln in path.read_text().splitlines():
        if "=" in ln and not ln.startswith("#"):
            k, _, v = ln.partition("=")
            keys.setdefault(k.strip(), v.strip())
    return keys


def test_unit_verifies_clean(tmp_path):
    r = _verify(UNIT.read_text(), tmp_path)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_tree_unit_verifies_clean(tmp_path):
    r = _verify(UNIT.read_text(), tmp_path, check="agentcg-tree.service")
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_checker_catches_a_misspelt_directive(tmp_path):
    """The check above would notice a broken unit: the same unit with one
    directive misspelt is reported."""
    r = _verify(UNIT.read_text().replace("Delegate=yes", "Delegat=yes"), tmp_path)
    assert "Delegat" in r.stdout + r.stderr
    r = _verify(UNIT.read_text(), tmp_path, TREE_UNIT.read_text().replace("KillMode=", "KilMode="),
                check="agentcg-tree.service")
    assert "KilMode" in r.stdout + r.stderr


def test_checker_needs_the_tree_unit_installed(tmp_path):
    """agentcgd.service does not load without agentcg-tree.service beside it."""
    _verify(UNIT.read_text(), tmp_path)
    (tmp_path / "agentcg-tree.service").unlink()
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "agentcgd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "agentcg-tree.service" in r.stdout + r.stderr


def test_unit_delegates_and_keeps_agents_on_restart():
    """The settings the daemon's design depends on (README, "Restart safety")."""
    keys = _keys(UNIT)
    assert keys["Delegate"] == "yes" and keys["KillMode"] == "process" and keys["Type"] == "notify"
    assert keys["RuntimeDirectoryPreserve"] == "yes"
    # the tree lives in a unit of its own, started first, never restarted with the daemon
    assert keys["BindsTo"] == "agentcg-tree.service" and "agentcg-tree.service" in keys["After"].split()
    assert int(keys["CPUWeight"]) == 10000


def test_tree_unit_holds_a_delegated_cgroup_and_stopping_it_is_the_teardown():
    keys = _keys(TREE_UNIT)
    assert keys["Delegate"] == "yes" and keys["KillMode"] == "control-group"
    assert keys["Type"] == "exec" and keys["ExecStart"] == "sleep infinity"
    assert keys["Restart"] == "no"
    # a User= would make systemd hand the delegated cgroup to that user
    assert "User" not in keys and "DynamicUser" not in keys
    # agentcgd must not pull the tree down with it: no dependency back on the daemon
    assert not any(k in keys for k in ("BindsTo", "Requires", "PartOf", "Wants"))
