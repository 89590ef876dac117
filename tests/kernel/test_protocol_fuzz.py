"""Protocol fuzzing against the real agentcgd on this host's cgroup2 tree:
thousands of schema-built and byte-mutated inputs (tests/protocol_fuzz.py)
from root and from uid 65534. The daemon must answer every input with
documented codes, never hang or crash, write only a trickle to its log, and
still answer `status` from the same pid afterwards."""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import daemon_dirs, remove_daemon_tree, require_cgroup2  # noqa: E402
import protocol_fuzz as fz  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
NOBODY = 65534
ROOT_INPUTS = 1500
NOBODY_INPUTS = 1000


@pytest.fixture
def fuzzed(request):
    root, runtime = daemon_dirs(request, require_cgroup2())
    log_path = str(runtime / "agentcgd.log")
    proc = fz.start_agentcgd(str(root), str(runtime), log_path)
    yield proc, str(runtime / "agentcg.sock"), log_path
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    remove_daemon_tree(root)
    shutil.rmtree(runtime, ignore_errors=True)


def _fuzz(sock: str, n: int, seed: int, pid: int) -> dict:
    driver = fz.Driver(sock)
    try:
        fz.run(driver, n, seed, pid)
    finally:
        driver.close()
    return driver.tally.to_dict()


def test_fuzzed_daemon_answers_everything_and_survives(fuzzed):
    proc, sock, log_path = fuzzed
    pid = fz.daemon_pid(sock)
    assert pid == proc.pid
    log_before = len(Path(log_path).read_text().splitlines())
    as_root = _fuzz(sock, ROOT_INPUTS, 1, pid)
    as_nobody = fz.as_uid(NOBODY, lambda: _fuzz(sock, NOBODY_INPUTS, 2, pid))
    assert "error" not in as_nobody, as_nobody
    for tally in (as_root, as_nobody):
        assert tally["violations"] == [] and tally["hangs"] == 0, tally
        # answers of many kinds came back: the inputs reached the handlers
        assert {"ok", "bad_request", "unsupported_version", "too_large", "not_found"} <= set(tally["codes"])
    assert as_root["inputs"] == ROOT_INPUTS and as_nobody["inputs"] == NOBODY_INPUTS
    assert "forbidden" in as_nobody["codes"] or "bad_pid" in as_nobody["codes"]
    assert proc.poll() is None and fz.daemon_pid(sock) == pid
    log = Path(log_path).read_text().splitlines()[log_before:]
    assert not any("Traceback" in line for line in log), "\n".join(log[:40])
    # malformed inputs are rate-limited per uid: a trickle, not a line each
    assert len(log) < 100, "\n".join(log[:40])
