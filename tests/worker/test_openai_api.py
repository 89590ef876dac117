"""The HTTP API with the official openai client against the real tiny engine (CPU).

Answers are checked against the same model run directly on an Engine: the
server must return exactly the greedy tokens the engine produces, decoded.
"""
from __future__ import annotations

import httpx
import openai
import pytest
from worker_harness import answer_text, direct_generate, gpu_blocks_used, wait_for

from agentcg.worker.server import encode_text

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three prime numbers."}]
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.base_url, api_key="x", max_retries=0, timeout=60)


def chat_ids(engine, messages):
    return encode_text(engine.tokenizer, engine.tokenizer.apply_chat_template(messages))


def test_models_lists_the_served_model(client, worker):
    models = client.models.list()
    assert [m.id for m in models.data] == [worker.model] == ["tiny"]


def test_chat_matches_direct_greedy_run(client, reference):
    ids = chat_ids(reference, MESSAGES)
    want, reason = direct_generate(reference, ids, MAX_TOKENS)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == answer_text(reference, want, reason)
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(ids), len(want), len(ids) + len(want))


def test_completion_matches_direct_greedy_run(client, reference):
    ids = encode_text(reference.tokenizer, PROMPT)
    want, reason = direct_generate(reference, ids, MAX_TOKENS)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == answer_text(reference, want, reason)
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    # token ids as the prompt give the same answer
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_framing(worker):
    with httpx.stream("POST", worker.base_url + "/completions", timeout=60,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                            "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_string_ends_the_answer_before_it(client, reference):
    ids = encode_text(reference.tokenizer, PROMPT)
    want, reason = direct_generate(reference, ids, MAX_TOKENS)
    text = answer_text(reference, want, reason)
    # a two-character stop string that first occurs a few characters into the answer
    stop = next((text[i:i + 2] for i in range(3, len(text) - 1)
                 if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) >= 3), None)
    assert stop, f"no usable stop string in {text!r}"
    expected = text[:text.index(stop)]
    assert expected
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True))
    assert streamed == expected


def test_bad_input_gets_openai_style_400_naming_the_field(client, worker):
    cases = [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=5), "temperature"),
        (dict(max_tokens=10**7), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for kw, field in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            client.completions.create(model="tiny", prompt="x", **kw)
        err = ei.value.body
        assert err["param"] == field and err["message"].startswith(field), err
        assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert ei.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert ei.value.body["param"] == "model" and "gpt-9" in ei.value.body["message"]
    r = httpx.post(worker.base_url + "/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="x", extra_headers={"X-Agentcg-Session": "no spaces"})
    assert ei.value.body["param"] == "x-agentcg-session"


def test_client_disconnect_mid_stream_frees_blocks(worker):
    base = worker.stats()
    with httpx.stream("POST", worker.base_url + "/completions", timeout=60,
                      json={"model": "tiny", "prompt": PROMPT * 8, "max_tokens": 800, "temperature": 0,
                            "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        it = (ln for ln in resp.iter_lines() if ln)
        got = [next(it) for _ in range(3)]
        assert all(g.startswith("data: {") for g in got)
        during = worker.stats()
        assert during["api"]["running"] == 1
        assert gpu_blocks_used(during) > gpu_blocks_used(base)
    # the connection is closed: the request is aborted and its blocks come back
    after = wait_for(lambda: (s := worker.stats())["api"]["running"] == 0 and s, what="abort")
    assert after["api"]["aborted"] == base["api"]["aborted"] + 1
    assert after["api"]["finished"] == base["api"]["finished"]
    assert gpu_blocks_used(after) == gpu_blocks_used(base)

