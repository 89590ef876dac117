"""Finding the tree unit's cgroup (daemon/systemd_tree.py) and its config
key, on a directory laid out like a cgroup2 mount (no kernel needed; the
holder move runs for real in tests/kernel/test_systemd_pid1_kernlab.py)."""
from __future__ import annotations

import logging

import pytest

from agentcg.core.config import ConfigError, parse_config
from agentcg.daemon.systemd_tree import find_tree_root, tree_unit_cgroup

TREE = "agentcg-tree.service"


def _never(unit: str) -> str:
    raise AssertionError(f"systemctl asked about {unit} although the sibling exists")


def test_tree_unit_is_the_sibling_of_the_daemons_own_unit(tmp_path):
    own = tmp_path / "system.slice" / "agentcgd.service"
    own.mkdir(parents=True)
    (tmp_path / "system.slice" / TREE).mkdir()
    assert tree_unit_cgroup(TREE, str(own), str(tmp_path), show=_never) == str(tmp_path / "system.slice" / TREE)


def test_tree_unit_in_another_slice_is_found_through_systemd(tmp_path):
    own = tmp_path / "system.slice" / "agentcgd.service"
    own.mkdir(parents=True)
    (tmp_path / "agents.slice" / TREE).mkdir(parents=True)
    asked = []

    def show(unit: str) -> str:
        asked.append(unit)
        return f"/agents.slice/{unit}"

    assert tree_unit_cgroup(TREE, str(own), str(tmp_path), show=show) == str(tmp_path / "agents.slice" / TREE)
    assert asked == [TREE]


@pytest.mark.parametrize("reported", ["", "/system.slice/gone.service", "not-a-path"])
def test_absent_or_inactive_tree_unit_is_none(tmp_path, reported):
    own = tmp_path / "system.slice" / "agentcgd.service"
    own.mkdir(parents=True)
    assert tree_unit_cgroup(TREE, str(own), str(tmp_path), show=lambda unit: reported) is None


def test_no_tree_unit_configured_asks_nothing(tmp_path):
    assert tree_unit_cgroup("", str(tmp_path / "system.slice" / "agentcgd.service"), str(tmp_path),
                            show=_never) is None


def test_missing_tree_unit_warns_of_the_restart_limitation(tmp_path, caplog):
    own = tmp_path / "system.slice" / "agentcgd.service"
    own.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="agentcg.daemon"):
        # "nope.service" has no sibling, and systemctl (absent or not PID 1 here) knows none
        assert find_tree_root("nope.service", str(own), str(tmp_path)) is None
    text = caplog.text
    assert "nope.service" in text and "systemd < 254" in text and "agentcg-tree.service" in text


def test_config_key():
    assert parse_config("").daemon.systemd_tree_unit == TREE
    assert parse_config('[daemon]\nsystemd_tree_unit = ""\n').daemon.systemd_tree_unit == ""
    assert parse_config('[daemon]\nsystemd_tree_unit = "my-tree.service"\n').daemon.systemd_tree_unit == \
        "my-tree.service"
    for bad in ("agentcg-tree", "../x.service", "agentcg.slice"):
        with pytest.raises(ConfigError, match="daemon.systemd_tree_unit"):
            parse_config(f'[daemon]\nsystemd_tree_unit = "{bad}"\n')
