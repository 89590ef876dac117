"""Request parsing and text assembly of the HTTP API: pure, no model needed."""
from __future__ import annotations

import pytest

from agentcg.worker.server import (ApiError, TextAssembler, encode_text, parse_messages, parse_prompt,
                                   parse_sampling, session_from_headers)
from agentcg.worker.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def assemble(text: str, stop: list[str]) -> tuple[str, list[str], bool]:
    """Feed `text` one byte token at a time; return (emitted text, deltas, stopped)."""
    asm = TextAssembler(TOK, stop)
    deltas = []
    for t in TOK.encode(text):
        d = asm.add(t)
        if d:
            deltas.append(d)
        if asm.stopped:
            break
    else:
        d = asm.finish()
        if d:
            deltas.append(d)
    return asm.text, deltas, asm.stopped


def test_text_without_stop_is_the_whole_decode():
    text = "héllo wörld ✓"
    out, deltas, stopped = assemble(text, [])
    assert out == text and "".join(deltas) == text and not stopped
    # an incomplete UTF-8 character is held back, never emitted as U+FFFD
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_before_it_and_is_not_emitted():
    out, deltas, stopped = assemble("abc STOP def", ["STOP"])
    assert stopped and out == "abc " and "".join(deltas) == "abc "


def test_stop_prefix_is_held_back_then_released():
    # "ST" looks like the start of "STOP" but the text goes elsewhere
    out, deltas, stopped = assemble("a ST b", ["STOP"])
    assert not stopped and out == "a ST b"
    # "S" and "ST" wait until the next byte shows they are not "STOP"
    assert deltas == ["a", " ", "ST ", "b"]


def test_earliest_of_several_stops_wins():
    out, _, stopped = assemble("xx\n\nyy###", ["###", "\n\n"])
    assert stopped and out == "xx"


def test_sampling_defaults_and_errors_name_the_field():
    sp = parse_sampling({}, chat=False, prompt_len=5, max_model_len=100)
    assert sp == {"max_tokens": 16, "temperature": 1.0, "stop": [], "stream": False, "include_usage": False}
    sp = parse_sampling({}, chat=True, prompt_len=5, max_model_len=100)
    assert sp["max_tokens"] == 95
    sp = parse_sampling({"max_completion_tokens": 7, "stop": "x", "stream": True,
                         "stream_options": {"include_usage": True}, "temperature": 0},
                        chat=True, prompt_len=5, max_model_len=100)
    assert (sp["max_tokens"], sp["stop"], sp["stream"], sp["include_usage"], sp["temperature"]) == \
        (7, ["x"], True, True, 0.0)
    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 96}, "max_tokens"),          # 5 + 96 > 100
        ({"temperature": 3}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"n": 2}, "n"),
        ({"top_p": 0.9}, "top_p"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 1}, "seed"),
        ({"stream": "yes"}, "stream"),
    ]
    for body, field in cases:
        with pytest.raises(ApiError) as ei:
            parse_sampling(body, chat=False, prompt_len=5, max_model_len=100)
        assert ei.value.param == field and ei.value.status == 400
        assert ei.value.message.startswith(field), ei.value.message
    # harmless "off" values of unsupported fields are accepted
    parse_sampling({"logprobs": None, "top_p": 1, "presence_penalty": 0, "n": 1}, chat=False,
                   prompt_len=5, max_model_len=100)
    with pytest.raises(ApiError) as ei:
        parse_sampling({}, chat=True, prompt_len=100, max_model_len=100)
    assert ei.value.code == "context_length_exceeded"


def test_messages_and_prompt_validation():
    msgs = parse_messages({"messages": [{"role": "developer", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}]})
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    for body, param in [({}, "messages"), ({"messages": []}, "messages"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "messages[0].content")]:
        with pytest.raises(ApiError) as ei:
            parse_messages(body)
        assert ei.value.param == param
    assert parse_prompt({"prompt": "hi"}, TOK, 259) == encode_text(TOK, "hi") == [256, 104, 105]
    assert parse_prompt({"prompt": [1, 2, 3]}, TOK, 259) == [1, 2, 3]
    assert parse_prompt({"prompt": ["hi"]}, TOK, 259) == [256, 104, 105]
    for bad in (None, 5, [], ["a", "b"], [1, 999], [1, True]):
        with pytest.raises(ApiError) as ei:
            parse_prompt({"prompt": bad}, TOK, 259)
        assert ei.value.param == "prompt"


def test_session_header():
    assert session_from_headers({}) is None
    assert session_from_headers({"x-agentcg-session": "agent-1"}) == "agent-1"
    assert session_from_headers({"x-session-id": "s.2"}) == "s.2"
    for bad in ("", "-x", "a b", "x" * 64):
        with pytest.raises(ApiError) as ei:
            session_from_headers({"x-agentcg-session": bad})
        assert ei.value.param == "x-agentcg-session"
