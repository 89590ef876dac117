"""Session header: the second turn of a session reuses the first turn's KV (real tiny engine, CPU)."""
from __future__ import annotations

import openai
from worker_harness import answer_text, direct_generate, prefilled_tokens

from agentcg.worker.server import encode_text

TURN_TOKENS = 16


def test_second_turn_reuses_prefix_and_answers_like_a_fresh_run(worker, reference):
    tok = reference.tokenizer
    p1 = encode_text(tok, "The agent reads main.py and then it " * 4)
    a1, r1 = direct_generate(reference, p1, TURN_TOKENS)
    p2 = p1 + a1 + tok.encode(" Next, it runs the tests:")
    a2, r2 = direct_generate(reference, p2, TURN_TOKENS)        # fresh, no session

    for header in ("X-Agentcg-Session", "X-Session-Id"):
        session = f"agent-{header[2:5].lower()}"
        client = openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60,
                               default_headers={header: session})
        t1 = client.completions.create(model="tiny", prompt=p1, max_tokens=TURN_TOKENS, temperature=0)
        assert t1.choices[0].text == answer_text(reference, a1, r1)

        before = prefilled_tokens(worker.stats())
        t2 = client.completions.create(model="tiny", prompt=p2, max_tokens=TURN_TOKENS, temperature=0)
        prefilled = prefilled_tokens(worker.stats()) - before
        assert t2.choices[0].text == answer_text(reference, a2, r2)
        # the first turn's prompt is not computed again: only its tail block at most
        assert prefilled <= len(p2) - len(p1) + worker.engine.cfg.block_size, (prefilled, len(p2), len(p1))
        assert prefilled < len(p2)

    # without a session the same second turn computes its whole prompt
    client = openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60)
    before = prefilled_tokens(worker.stats())
    t2 = client.completions.create(model="tiny", prompt=p2, max_tokens=TURN_TOKENS, temperature=0)
    assert prefilled_tokens(worker.stats()) - before == len(p2)
    assert t2.choices[0].text == answer_text(reference, a2, r2)


def test_chat_history_as_the_next_turn(worker, reference):
    """A chat agent sends the whole history again; the answer is the same as without a session."""
    client = openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60,
                           default_headers={"X-Agentcg-Session": "chat-agent"})
    msgs = [{"role": "user", "content": "List the files."}]
    first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=TURN_TOKENS,
                                           temperature=0)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Now open the first one."}]
    before = prefilled_tokens(worker.stats())
    second = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=TURN_TOKENS,
                                            temperature=0)
    prefilled = prefilled_tokens(worker.stats()) - before
    ids = encode_text(reference.tokenizer, reference.tokenizer.apply_chat_template(msgs))
    want, reason = direct_generate(reference, ids, TURN_TOKENS)
    assert second.choices[0].message.content == answer_text(reference, want, reason)
    assert prefilled < len(ids)
