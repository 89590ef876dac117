"""Daemon parts that need no kernel: root choice, pid rule, state file, hooks."""
from __future__ import annotations

import os

import pytest

from agentcg import protocol as p
from agentcg.core.config import Config
from agentcg.core.intents import Intent
from agentcg.core.model import Limits
from agentcg.daemon.app import choose_root
from agentcg.daemon.hooks import Hooks
from agentcg.daemon.handlers import Peer, check_pid
from agentcg.daemon.state import CallRecord, Journal, SessionRecord, load_state, save_state


def test_root_under_systemd_is_the_service_cgroup():
    cfg = Config()
    env = {"INVOCATION_ID": "abc"}
    assert choose_root(cfg, env, "/system.slice/agentcgd.service", "/sys/fs/cgroup") == \
        ("/sys/fs/cgroup/system.slice/agentcgd.service", True)
    # restarted inside its own leaf
    assert choose_root(cfg, env, "/system.slice/agentcgd.service/daemon", "/sys/fs/cgroup")[1] is True
    assert choose_root(cfg, {}, "/user.slice/x.scope", "/sys/fs/cgroup") == ("/sys/fs/cgroup/agentcg", False)


def test_pid_rule():
    me = os.getpid()
    peer = Peer(pid=me, uid=os.getuid(), gid=0)
    check_pid(me, peer, child_only=True, own_pid=1)            # the caller itself
    with pytest.raises(p.ProtocolError) as ei:
        check_pid(me, peer, child_only=True, own_pid=me)       # never the daemon
    assert ei.value.code == p.E_BAD_PID
    with pytest.raises(p.ProtocolError) as ei:
        check_pid(2 ** 22 + 7, peer, child_only=True, own_pid=1)
    assert "does not exist" in ei.value.message
    other = Peer(pid=me, uid=65534, gid=65534)
    with pytest.raises(p.ProtocolError) as ei:
        check_pid(me, other, child_only=False, own_pid=1)
    assert "does not belong to uid 65534" in ei.value.message
    with pytest.raises(p.ProtocolError) as ei:
        check_pid("12", peer, child_only=True, own_pid=1)
    assert ei.value.code == p.E_BAD_REQUEST


def test_state_round_trip(tmp_path):
    s = SessionRecord(name="a", uid=1000, intent=Intent.parse("memory=1G"),
                      limits=Limits(memory_max_bytes=2 << 30), created_time=1.0, next_call=4)
    s.calls[3] = CallRecord(session="a", n=3, name="pytest", uid=1000, pid=42,
                            intent=Intent.parse("pids=10"), limits=Limits(pids_max=10),
                            start_ns=123, start_time=2.0, argv=["pytest"])
    save_state(tmp_path / "state.json", "/sys/fs/cgroup/agentcg", {"a": s})
    root, back = load_state(tmp_path / "state.json")
    assert root == "/sys/fs/cgroup/agentcg"
    assert back["a"].to_dict() == s.to_dict()
    assert load_state(tmp_path / "missing.json") == (None, {})
    (tmp_path / "bad.json").write_text("{")
    assert load_state(tmp_path / "bad.json") == (None, {})


def test_journal_replays_call_starts_and_ends_over_the_state_file(tmp_path):
    state = tmp_path / "state.json"
    s = SessionRecord(name="a", uid=1000, intent=Intent(), limits=Limits(), created_time=1.0)
    save_state(state, "/cg", {"a": s})
    j = Journal(state)

    def call(n):
        return CallRecord(session="a", n=n, name=f"t{n}", uid=1000, pid=0, intent=Intent.parse("pids=10"),
                          limits=Limits(pids_max=10), start_ns=n, start_time=2.0, argv=["true"])
    for n in (1, 2, 3):
        j.append({"op": "start", "call": call(n).to_dict()})
    j.append({"op": "pid", "session": "a", "n": 2, "pid": 77})
    j.append({"op": "end", "session": "a", "n": 1, "done": 1})
    j.append({"op": "end", "session": "gone", "n": 9, "done": 1})        # a session the state file lacks: skipped
    with open(j.path, "ab") as f:
        f.write(b'{"op":"end","sess')                         # torn by a crash mid-write: skipped
    _root, back = load_state(state)
    a = back["a"]
    assert sorted(a.calls) == [2, 3] and a.calls_done == 1 and a.next_call == 4
    assert a.calls[2].pid == 77 and a.calls[3].to_dict() == call(3).to_dict()
    # the rewrite that empties the journal holds the same; replaying again changes nothing
    save_state(state, "/cg", back)
    assert load_state(state)[1]["a"].to_dict() == a.to_dict()
    j.truncate()
    assert j.path.read_bytes() == b"" and load_state(state)[1]["a"].to_dict() == a.to_dict()
    j.close()


def test_hooks_isolate_failures_and_merge_extra_stats():
    class Good:
        def on_call_end(self, session, call, path):
            return {"bpf_execs": 3}

        def status(self):
            return {"ok": True}

    class Bad:
        def on_call_end(self, session, call, path):
            raise RuntimeError("boom")

    hooks = Hooks([Bad(), Good()])
    assert hooks.call_end(None, None, None) == {"bpf_execs": 3}
    assert hooks.status() == {"Good": {"ok": True}}
    hooks.call_start(None, None, None)   # no hook has it: nothing happens


def test_signal_watch_closed_while_a_wait_is_being_cancelled():
    """Shutdown order in the daemon: the policy loop's task is cancelled, then
    the watch is closed before the inner wait has finished unwinding; that
    wait must end quietly, not with 'I/O operation on closed epoll object'."""
    import asyncio

    from agentcg.adapters.psi import SignalWatch

    async def go():
        w = SignalWatch()
        t = asyncio.ensure_future(w.wait(5.0))
        await asyncio.sleep(0.01)
        t.cancel()
        w.close()
        results = await asyncio.gather(t, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)

    asyncio.run(go())


def test_policy_snapshot_reads_budget_idle_cache_and_page_size(tmp_path):
    """The loop's snapshot over a tree of interface files: the budget from the
    root's memory.max, idle page cache from its memory.stat, the call's
    values through descriptors kept open (a rewrite of the file is seen)."""
    import os
    from types import SimpleNamespace

    from agentcg.adapters.cgroupfs import CgroupFs
    from agentcg.core.intents import Intent
    from agentcg.core.policy import load_ruleset
    from agentcg.daemon.policy import PolicyLoop

    def files(d, **kv):
        d.mkdir(parents=True, exist_ok=True)
        for k, v in kv.items():
            (d / k.replace("__", ".")).write_text(f"{v}\n")

    files(tmp_path, memory__max=1 << 30, memory__current=300 << 20,
          memory__stat="anon 100\ninactive_file 12582912\nactive_file 4096")
    files(tmp_path / "s-a", memory__current=200 << 20)
    files(tmp_path / "s-a" / "c-1", memory__current=50 << 20, memory__high=64 << 20)
    call = SimpleNamespace(rel="s-a/c-1", argv=["pytest"], name="pytest", start_ns=0, intent=Intent())
    sess = SimpleNamespace(name="a", rel="s-a", calls={1: call}, intent=Intent(priority=8))
    loop = PolicyLoop(CgroupFs(tmp_path), load_ruleset({"preset": "adaptive"}), dry_run=True)
    try:
        loop.sessions["a"] = sess
        snap = loop.snapshot()
        assert snap.host.budget_bytes == 1 << 30 and snap.host.usage_bytes == 300 << 20
        assert snap.host.inactive_file_bytes == 12 << 20
        assert snap.host.page_bytes == os.sysconf("SC_PAGE_SIZE")
        [c] = snap.sessions[0].calls
        assert (c.cg.memory_current_bytes, c.cg.memory_high_bytes) == (50 << 20, 64 << 20)
        (tmp_path / "s-a" / "c-1" / "memory.current").write_text(f"{60 << 20}\n")
        assert loop.snapshot().sessions[0].calls[0].cg.memory_current_bytes == 60 << 20
        assert loop.files.open_count() > 0
        opened = loop.files.open_count()
        del sess.calls[1]                  # the call ended: the next tick lets its files go
        loop.snapshot()
        assert loop.files.open_count() < opened
        assert "s-a/c-1" not in loop.files._fds
    finally:
        loop.close()
