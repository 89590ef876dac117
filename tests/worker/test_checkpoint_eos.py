"""A checkpoint without tokenizer.json ends its answers on its own end tokens
(config.json or generation_config.json, an int or a list), not on the byte
tokenizer's 257."""
from __future__ import annotations

import json

import pytest
from hf_checkpoints import build_llama, hf_greedy
from worker_harness import direct_generate, served

from agentcg.worker.engine import Engine, EngineConfig

torch = pytest.importorskip("torch")

PROMPT = [11, 42, 7, 99, 250, 3, 17, 128]
N = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers' greedy continuation of PROMPT with no end token)."""
    d = tmp_path_factory.mktemp("eos") / "ckpt"
    hf = build_llama(d, eos_token_id=None, bos_token_id=None)
    return d, hf_greedy(hf, PROMPT, N)


def _first_new(tokens: list[int], start: int) -> int:
    """Index of the first token from `start` on that did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def _set_eos(directory, config_eos, generation_eos=None) -> None:
    for name, val in (("config.json", config_eos), ("generation_config.json", generation_eos)):
        path = directory / name
        cfg = json.loads(path.read_text())
        cfg["eos_token_id"] = val
        path.write_text(json.dumps(cfg))


def _engine(directory) -> Engine:
    return Engine(EngineConfig(model=str(directory), device="cpu", dtype="float32", gpu_blocks=16,
                               host_blocks=16, measure=False))


def test_generation_stops_at_config_json_eos_id(checkpoint):
    d, expected = checkpoint
    i = _first_new(expected, 2)
    _set_eos(d, expected[i])
    engine = _engine(d)
    assert not (d / "tokenizer.json").exists()
    got, reason = direct_generate(engine, PROMPT, N)
    assert (got, reason) == (expected[:i + 1], "stop")
    assert engine.stop_token_ids == (expected[i],)


def test_generation_stops_at_any_id_of_generation_config_list(checkpoint):
    d, expected = checkpoint
    i = _first_new(expected, 1)
    unused = next(t for t in range(300) if t not in expected)
    _set_eos(d, unused, [unused, expected[i]])
    engine = _engine(d)
    got, reason = direct_generate(engine, PROMPT, N)
    assert (got, reason) == (expected[:i + 1], "stop")
    assert set(engine.stop_token_ids) == {unused, expected[i]}


def test_api_answer_ends_on_checkpoint_eos(checkpoint, tmp_path):
    openai = pytest.importorskip("openai")
    d, expected = checkpoint
    i = _first_new(expected, 2)
    _set_eos(d, [expected[i]])
    with served(tmp_path, model=str(d), measure=False, gpu_blocks=16) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
        r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == i + 1
