from __future__ import annotations

import ctypes

import pytest

from agentcg.adapters import bpf_types as T


def _record(**kw) -> bytes:
    ev = T.AgentcgEvent()
    for k, v in kw.items():
        setattr(ev, k, v)
    return bytes(ev)


def test_decode_exec_splits_argv_past_nul_bytes():
    args = b"/usr/bin/python3\0-c\0print(1)\0"
    rec = bytearray(_record(type=T.AGENTCG_EV_EXEC, pid=10, tgid=10, ppid=9, cgroup_id=77, ts_ns=5,
                            comm=b"python3", filename=b"/usr/bin/python3", args_len=len(args)))
    off = T.AgentcgEvent.args.offset
    rec[off:off + len(args)] = args
    ev = T.decode_event(bytes(rec))
    assert ev.kind == "exec" and ev.pid == 10 and ev.ppid == 9 and ev.cgroup_id == 77
    assert ev.argv == ("/usr/bin/python3", "-c", "print(1)")
    assert ev.filename == "/usr/bin/python3" and ev.comm == "python3"


def test_decode_truncated_args_flag_and_partial_last_arg():
    args = b"a\0bc"
    rec = bytearray(_record(type=T.AGENTCG_EV_EXEC, args_len=len(args), flags=T.AGENTCG_EVF_ARGS_TRUNCATED))
    off = T.AgentcgEvent.args.offset
    rec[off:off + len(args)] = args
    ev = T.decode_event(bytes(rec))
    assert ev.argv == ("a", "bc") and ev.args_truncated


def test_decode_exit_keeps_status_and_ignores_filename():
    ev = T.decode_event(_record(type=T.AGENTCG_EV_EXIT, pid=3, tgid=3, exit_code=7 << 8, filename=b"junk"))
    assert ev.kind == "exit" and ev.exit_code == 7 << 8 and ev.filename == "" and ev.argv == ()


def test_decode_rejects_short_and_unknown_records():
    with pytest.raises(T.EventDecodeError, match="bytes"):
        T.decode_event(b"\0" * 10)
    with pytest.raises(T.EventDecodeError, match="unknown event type 99"):
        T.decode_event(_record(type=99))


def test_hist_percentile_upper_bounds():
    slots = [0] * T.AGENTCG_RUNQ_SLOTS
    slots[10] = 90   # [1024, 2048) ns
    slots[20] = 10   # [1 Mi, 2 Mi) ns
    assert T.hist_percentile_ns(slots, 50) == 2048
    assert T.hist_percentile_ns(slots, 99) == 1 << 21
    assert T.hist_percentile_ns([0] * 4, 50) is None
    with pytest.raises(ValueError, match="pct=0"):
        T.hist_percentile_ns(slots, 0)
