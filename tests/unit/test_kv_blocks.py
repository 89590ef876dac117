"""Block bookkeeping without torch: allocation, ref counts, swap plans, shrink."""
from __future__ import annotations

import pytest

from agentcg.core.kv_blocks import KVBlockError, KVBlockManager, OutOfBlocks


def mgr(gpu=16, host=16, chunk=4):
    return KVBlockManager(block_size=4, gpu_blocks=gpu, host_blocks=host, chunk_blocks=chunk)


def test_allocate_lowest_first_and_free():
    m = mgr()
    assert m.ensure_tokens("a", 9) == [0, 1, 2]
    assert m.ensure_tokens("a", 12) == []
    assert m.ensure_tokens("b", 1) == [3]
    assert m.num_free_gpu == 12
    m.check()
    assert m.free("a") == 3 and m.num_free_gpu == 15
    assert m.ensure_tokens("c", 4) == [0]
    m.check()
    with pytest.raises(OutOfBlocks, match="needs 20"):
        m.allocate("d", 20)


def test_shared_blocks_keep_ref_counts():
    m = mgr()
    m.ensure_tokens("a", 8)
    m.share("a", "b", 2)
    assert m.ref[0] == 2 and m.ref[1] == 2
    assert not m.can_swap_out("a")
    with pytest.raises(KVBlockError, match="shares"):
        m.swap_out("a")
    m.free("a")
    assert m.ref[0] == 1 and m.num_free_gpu == 14
    m.check()


def test_swap_out_in_plans_are_contiguous_runs():
    m = mgr()
    m.ensure_tokens("x", 4)            # block 0
    m.ensure_tokens("a", 12)           # blocks 1..3
    m.ensure_tokens("y", 4)            # block 4
    plan = m.swap_out("a")
    assert plan.direction == "out"
    assert plan.moves == ((0, 1, 0), (1, 2, 1), (2, 3, 2))
    assert plan.runs == ((0, 3, 0),)
    assert m.table("a").where == "host" and m.num_free_gpu == 14 and m.num_free_host == 13
    m.check()
    back = m.swap_in("a")
    assert [mv[1] for mv in back.moves] == [0, 1, 2]
    assert [mv[2] for mv in back.moves] == m.table("a").blocks
    assert m.num_free_host == 16 and m.table("a").where == "gpu"
    m.check()


def test_fragmented_host_gives_several_runs():
    m = mgr(gpu=16, host=6)
    for o in ("a", "b", "c"):
        m.ensure_tokens(o, 8)
    m.swap_out("a"); m.swap_out("b"); m.swap_out("c")
    m.swap_in("b")                                 # hole at slots 2..3
    m.ensure_tokens("d", 16)
    with pytest.raises(OutOfBlocks):
        m.swap_out("d")
    m.free("a")                                    # holes 0..1, 2..3 merge -> 0..3
    plan = m.swap_out("d")
    assert plan.runs == ((0, 4, 0),)
    m.check()


def test_double_release_is_detected():
    m = mgr()
    m.ensure_tokens("a", 4)
    m._release(0)
    with pytest.raises(KVBlockError, match="released more often"):
        m._release(0)


def test_shrink_moves_live_blocks_and_takes_chunks_offline():
    m = mgr(gpu=16, chunk=4)
    m.ensure_tokens("a", 4 * 6)        # blocks 0..5
    m.free("a")
    m.ensure_tokens("b", 4 * 2)        # 0, 1
    chunks, evict = m.plan_shrink(2)
    assert chunks == [3, 2] and evict == []
    plan = m.take_offline(chunks)
    assert plan.moves == ()
    assert m.num_online_gpu == 8 and m.num_free_gpu == 6
    m.check()
    # a live block in the next chunk to go moves into chunk 0
    m.ensure_tokens("c", 4 * 3)        # 2, 3, 4
    m.free("b")
    chunks, evict = m.plan_shrink(1)
    assert chunks == [1] and evict == []
    plan = m.take_offline(chunks)
    assert plan.moves == (("c", 2, 4, 0),)
    assert m.table("c").blocks == [2, 3, 0]
    m.check()
    assert m.bring_online(5) == [1, 2, 3] and m.num_online_gpu == 16
    m.check()


def test_shrink_names_owners_to_evict_when_full():
    m = mgr(gpu=8, chunk=4)
    m.ensure_tokens("a", 16)           # 0..3
    m.ensure_tokens("b", 16)           # 4..7
    chunks, evict = m.plan_shrink(1)
    assert chunks == [1] and evict == ["b"]
    with pytest.raises(OutOfBlocks):
        m.take_offline(chunks)
    m.check()                          # undo left everything as it was


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="block_size"):
        KVBlockManager(block_size=0, gpu_blocks=4, host_blocks=0, chunk_blocks=1)
    with pytest.raises(ValueError, match="gpu_blocks"):
        KVBlockManager(block_size=4, gpu_blocks=0, host_blocks=0, chunk_blocks=1)
