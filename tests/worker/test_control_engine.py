"""Control ops over the Unix socket against the real tiny engine (CPU)."""
from __future__ import annotations

import threading

import openai
import pytest
from worker_harness import (answer_text, direct_generate, gpu_blocks_total, gpu_blocks_used, prefilled_tokens,
                            wait_for)

from agentcg.worker.control import ControlError, WorkerControl
from agentcg.worker.server import encode_text

TURN_TOKENS = 16


@pytest.fixture
def wc(worker):
    with WorkerControl(worker.socket_path, timeout_s=60) as c:
        yield c


def session_client(worker, session):
    return openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60,
                         default_headers={"X-Agentcg-Session": session})


@pytest.mark.parametrize("mode", ["swap", "keep", "drop"])
def test_suspend_resume_then_next_turn_gives_identical_tokens(worker, reference, wc, mode):
    tok = reference.tokenizer
    session = f"ctl-{mode}"
    p1 = encode_text(tok, f"Session {mode}: the agent edits a file and then " * 3)
    a1, r1 = direct_generate(reference, p1, TURN_TOKENS)
    p2 = p1 + a1 + tok.encode(" and the tool call returned.")
    a2, r2 = direct_generate(reference, p2, TURN_TOKENS)

    client = session_client(worker, session)
    t1 = client.completions.create(model="tiny", prompt=p1, max_tokens=TURN_TOKENS, temperature=0)
    assert t1.choices[0].text == answer_text(reference, a1, r1)
    used_before = gpu_blocks_used(wc.stats())

    reply = wc.suspend(session, mode=mode, ttl_s=300)
    assert isinstance(reply, dict)
    after_suspend = wc.stats()
    if mode == "keep":
        assert gpu_blocks_used(after_suspend) == used_before
    else:
        assert gpu_blocks_used(after_suspend) < used_before, "the session's device blocks are freed"
    if mode == "drop":
        # nothing is left to bring back; the next turn recomputes
        with pytest.raises(ControlError) as ei:
            wc.resume(session)
        assert ei.value.code == "refused" and session in ei.value.message
    else:
        wc.resume(session)
        assert gpu_blocks_used(wc.stats()) == used_before, "resume brings the blocks back to the device"

    before = prefilled_tokens(wc.stats())
    t2 = client.completions.create(model="tiny", prompt=p2, max_tokens=TURN_TOKENS, temperature=0)
    prefilled = prefilled_tokens(wc.stats()) - before
    assert t2.choices[0].text == answer_text(reference, a2, r2)
    if mode == "drop":
        assert prefilled == len(p2), "a dropped session is recomputed"
    else:
        assert prefilled <= len(p2) - len(p1) + worker.engine.cfg.block_size


def test_unknown_session_is_refused_with_its_name(wc):
    with pytest.raises(ControlError) as ei:
        wc.suspend("never-seen")
    assert ei.value.code == "refused" and "never-seen" in ei.value.message


def test_shrink_then_grow_while_requests_run(worker, reference, wc):
    tok = reference.tokenizer
    n_tokens = 120
    prompts = [encode_text(tok, f"request {i}: " + "x" * (10 + 7 * i)) for i in range(4)]
    want = [answer_text(reference, *direct_generate(reference, p, n_tokens)) for p in prompts]
    client = openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=120)
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            got[i] = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=n_tokens, temperature=0, stream=True))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    total0 = gpu_blocks_total(wc.stats())
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    during = wait_for(lambda: (s := wc.stats())["api"]["running"] == len(prompts) and s,
                      what="all requests running")
    # take three quarters of the pool away while four requests hold blocks, then give it back
    shrunk = wc.shrink(total0 * 3 // 4 * during["block_bytes"])
    assert shrunk["freed_bytes"] >= total0 * 3 // 4 * during["block_bytes"], shrunk
    assert gpu_blocks_total(wc.stats()) <= total0 // 4
    grown = wc.grow(shrunk["freed_bytes"])
    assert grown["grown_bytes"] == shrunk["freed_bytes"], grown
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[i] for i in range(len(prompts))] == want
    assert gpu_blocks_total(wc.stats()) == total0
