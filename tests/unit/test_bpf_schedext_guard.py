"""The scheduler refuses to load without sched_ext or over another scheduler
(checked before anything is loaded: no root needed)."""
from __future__ import annotations

import pytest


def test_refuses_when_sched_ext_absent_or_another_scheduler_active(monkeypatch, tmp_path):
    from agentcg.adapters import bpf
    monkeypatch.setattr(bpf, "SCHED_EXT_DIR", tmp_path / "missing")
    with pytest.raises(bpf.SchedExtUnavailable, match="no sched_ext"):
        bpf.SchedExt()
    (tmp_path / "se" / "root").mkdir(parents=True)
    (tmp_path / "se" / "state").write_text("enabled\n")
    (tmp_path / "se" / "root" / "ops").write_text("scx_other\n")
    monkeypatch.setattr(bpf, "SCHED_EXT_DIR", tmp_path / "se")
    with pytest.raises(bpf.SchedExtUnavailable, match="another sched_ext scheduler.*scx_other"):
        bpf.SchedExt()
