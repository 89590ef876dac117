"""Resume from swap overlapped layer by layer with the new tokens' prefill (CPU).

On CPU a swap-in piece is copied when the forward pass waits for its layer,
and until then the destination blocks hold NaN (kv_torch.KVPool), so these
tests see the order of copies and reads, and a read before its copy spoils
the tokens.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agentcg.worker import runner  # noqa: E402
from agentcg.worker.engine import Engine, EngineConfig, Request  # noqa: E402

P1 = [(5 * j + 3) % 250 for j in range(45)]
NEW = [11, 12, 13, 14, 15, 16, 17]


def make_engine(**kw) -> Engine:
    return Engine(EngineConfig(model="small", device="cpu", gpu_blocks=64, chunk_blocks=8, host_blocks=64,
                               measure=False, **kw))


def run_one(e: Engine, req: Request) -> list[int]:
    e.add_request(req)
    toks = []
    while e.has_work():
        toks += [ev.token_id for ev in e.step() if ev.request_id == req.request_id]
    return toks


def two_turns(e: Engine, pause: str, between=None, before_resume=None) -> list[int]:
    """Turn 1, pause (none | swap | swap+resume), turn 2: turn 2's tokens.
    before_resume(e), between(e): hooks after the swap-out and before turn 2."""
    o1 = run_one(e, Request("t1", P1, max_tokens=6, session_id="s"))
    if pause != "none":
        assert e.suspend("s", "swap")["where"] == "host"
        if before_resume:
            before_resume(e)
        if pause.endswith("resume"):
            assert e.resume("s")["swapped_in"] is True
    if between:
        between(e)
    return run_one(e, Request("t2", P1 + o1 + NEW, max_tokens=8, session_id="s"))


@pytest.fixture(scope="module")
def never_swapped() -> list[int]:
    return two_turns(make_engine(), "none")


@pytest.mark.parametrize("pause", ["swap", "swap+resume"])
def test_overlapped_resume_gives_the_tokens_of_no_swap_and_of_a_full_swap_in(never_swapped, pause):
    e = make_engine()
    overlapped = two_turns(e, pause)
    assert e.stats()["swap"]["swap_in_count"] == 1
    assert e.counters["reused_tokens"] == len(P1) + 5       # the context came back, it was not recomputed
    serial = two_turns(make_engine(overlap_swap_in=False), pause)
    eager = make_engine()
    eager.swapper.lazy = False                  # every copy queued when the swap-in is planned
    assert overlapped == never_swapped == serial == two_turns(eager, pause)
    e.bm.check()


def traced_resume(overlap: bool, pause: str) -> list[tuple]:
    e = make_engine(overlap_swap_in=overlap)
    L = e.model.shape.n_layers

    def start_trace(e):
        if pause.endswith("resume"):         # a prefetch copies nothing before a step asks for it
            assert e.swapper.has_unissued()
            t = e.bm.table("ses:s")
            assert all(torch.isnan(e.kv.chunks[b // e.kv.cb][:, b % e.kv.cb]).all() for b in t.blocks)
        e.kv.trace = []

    two_turns(e, pause, start_trace)
    trace = e.kv.trace
    ready = [trace.index(("ready", layer)) for layer in range(L)]
    assert len([x for x in trace if x[0] == "ready"]) == L          # each layer brought in once
    for layer in range(L):
        first_use = min(trace.index(("write", layer)), trace.index(("read", layer)))
        assert ready[layer] < first_use, (layer, trace)
    return trace


@pytest.mark.parametrize("pause", ["swap", "swap+resume"])
def test_each_layer_is_copied_before_its_attention_and_after_the_previous_layers(pause):
    trace = traced_resume(True, pause)
    L = max(x[1] for x in trace) + 1
    for layer in range(L - 1):
        # overlap: the copy of layer i+1 is issued only once layer i's attention has read its KV
        assert trace.index(("read", layer)) < trace.index(("ready", layer + 1)), trace


def test_serial_arrangement_copies_everything_before_the_prefill():
    trace = traced_resume(False, "swap")
    last_ready = max(i for i, x in enumerate(trace) if x[0] == "ready")
    first_use = min(i for i, x in enumerate(trace) if x[0] in ("read", "write"))
    assert last_ready < first_use


def test_without_the_per_layer_wait_the_prefill_reads_blocks_not_yet_copied(never_swapped, monkeypatch):
    """The check above has teeth: drop the wait and the resumed turn's tokens change."""
    monkeypatch.setattr(runner.StepBatch, "wait_layer", lambda self, layer: None)
    assert two_turns(make_engine(), "swap") != never_swapped


def test_prefetch_of_a_dropped_session_lands_before_its_blocks_are_reused(never_swapped):
    """resume() then drop: the blocks go to the next request, whose tokens must
    not be overwritten by the late copy."""
    e = make_engine()
    other = [(7 * j + 1) % 250 for j in range(60)]
    alone = run_one(make_engine(), Request("o", other, max_tokens=8))

    def drop_and_reuse(e):
        e.suspend("s", "drop")
        assert run_one(e, Request("o", other, max_tokens=8)) == alone

    two_turns(e, "swap+resume", drop_and_reuse)
    assert not e.swapper.has_unissued()
    e.bm.check()


def test_shrink_right_after_resume_moves_the_blocks_once_they_are_in(never_swapped):
    e = make_engine()
    moved = []

    def fill_low_blocks(e):              # the context comes back into the chunks that go offline
        e.bm.ensure_tokens("filler", 40 * e.bm.block_size)

    def shrink(e):
        e.bm.free("filler")
        assert e.swapper.has_unissued()
        moved.append(e.shrink(e.kv.chunk_bytes * 6)["moved_blocks"])

    assert two_turns(e, "swap+resume", shrink, fill_low_blocks) == never_swapped
    assert moved[0] > 0
    e.bm.check()


class FakeEvent:
    """Stands in for torch.cuda.Event: logs where it is recorded (the copies
    themselves run synchronously on CPU tensors)."""
    log: list = []

    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        FakeEvent.log.append(("record", stream.name, self))

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.0


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_event(self, ev):
        FakeEvent.log.append(("wait", self.name, ev))


@pytest.mark.parametrize("overlap", [True, False])
def test_cuda_event_wiring_with_fake_streams(never_swapped, monkeypatch, overlap):
    """The CUDA branch of the swap-in, with logging fakes for streams and events:
    overlapped, compute waits once per layer, for that layer's copy event, after
    it was recorded and before the pieces lookahead+1 layers further on are
    issued; serial, compute waits once, for the whole swap-in."""
    import contextlib

    compute = FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    e = make_engine(overlap_swap_in=overlap)
    kv = e.kv
    kv.cuda, kv.link_stream, kv.dev_stream = True, FakeStream("link"), FakeStream("dev")
    kv.lookahead, kv.poison_in_flight = 1, False
    handles = []
    real_swap_in = kv.swap_in
    monkeypatch.setattr(kv, "swap_in", lambda *a, **k: handles.append(real_swap_in(*a, **k)) or handles[-1])

    def start_log(e):
        FakeEvent.log = []

    assert two_turns(e, "swap", start_log) == never_swapped
    (h,) = handles
    log = FakeEvent.log
    waits = [ev for op, stream, ev in log if op == "wait" and stream == "compute"]
    if not overlap:
        assert waits[0] is h.done and all(ev not in waits for ev in h.layer_ready)
        return
    L = e.model.shape.n_layers
    assert waits[:L] == h.layer_ready                         # one wait per layer, in layer order
    pos = {id(ev): i for i, (op, stream, ev) in enumerate(log) if op == "record"}
    for layer in range(L):
        at = next(i for i, x in enumerate(log) if x[0] == "wait" and x[2] is h.layer_ready[layer])
        assert pos[id(h.layer_ready[layer])] < at
        later = layer + kv.lookahead + 1
        if later < L:
            assert at < pos[id(h.layer_ready[later])]        # that layer's copy was not issued yet
