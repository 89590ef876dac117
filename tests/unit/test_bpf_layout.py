"""The ctypes mirror in agentcg/adapters/bpf_types.py matches bpf/agentcg.h.

bpf/.output/layout.json is written by `make -C bpf` from the header itself
(bpf/layout.c, compiled with the host compiler)."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agentcg.adapters import bpf_types as T

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


@pytest.fixture(scope="module")
def layout():
    path = BPF_DIR / ".output" / "layout.json"
    if not path.exists():
        if shutil.which("cc") is None or shutil.which("make") is None:
            pytest.skip("no host compiler to build bpf/.output/layout.json")
        subprocess.run(["make", "-C", str(BPF_DIR), ".output/layout.json"], check=True, capture_output=True)
    return json.loads(path.read_text())


def test_struct_sizes_and_offsets_match_header(layout):
    assert set(layout["structs"]) == set(T.MIRRORS)
    for name, spec in layout["structs"].items():
        cls = T.MIRRORS[name]
        assert ctypes.sizeof(cls) == spec["size"], name
        mirror = {f[0] for f in cls._fields_}
        assert mirror == set(spec["fields"]), name
        for field, (off, size) in spec["fields"].items():
            desc = getattr(cls, field)
            assert (desc.offset, desc.size) == (off, size), f"{name}.{field}"


def test_constants_match_header(layout):
    for name, value in layout["consts"].items():
        assert getattr(T, name) == value, name
