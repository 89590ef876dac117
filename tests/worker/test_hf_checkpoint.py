"""Checkpoints written by Hugging Face transformers load into the worker and
compute what transformers computes: logits within 1e-4 (float32) and the same
greedy tokens through the worker's paged KV cache (chunked prefill, then
decode), for both config.json layouts, GQA, tied embeddings and llama3 RoPE
scaling at lengths past original_max_position_embeddings.
"""
from __future__ import annotations

import json

import pytest
from hf_checkpoints import LLAMA3_ROPE, build_llama, hf_greedy, hf_logits, to_old_layout
from worker_harness import direct_generate

from agentcg.worker.engine import Engine, EngineConfig
from agentcg.worker.shapes import shape_from_hf_config

torch = pytest.importorskip("torch")

NEW_TOKENS = 8


def _engine(directory) -> Engine:
    # max_step_tokens < prompt: the prefill runs in chunks, the later ones attending to cached blocks
    return Engine(EngineConfig(model=str(directory), device="cpu", dtype="float32", gpu_blocks=64,
                               host_blocks=64, measure=False, max_step_tokens=256))


def _prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _check_against_hf(tmp_path, rope: dict, layout: str, prompt_len: int, tie: bool = True) -> None:
    hf = build_llama(tmp_path / "ckpt", rope=rope, layout=layout, tie=tie)
    engine = _engine(tmp_path / "ckpt")
    ids = _prompt(prompt_len, hf.config.vocab_size)
    ours = engine.model.reference_forward(ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e} against transformers"
    got, reason = direct_generate(engine, ids, NEW_TOKENS)
    assert reason == "length"
    assert got == hf_greedy(hf, ids, NEW_TOKENS)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_default_rope_theta_read_from_either_layout(tmp_path, layout):
    _check_against_hf(tmp_path, {"rope_type": "default", "rope_theta": 500000.0}, layout, prompt_len=300)
    assert shape_from_hf_config(tmp_path / "ckpt" / "config.json").rope_theta == 500000.0


@pytest.mark.parametrize("layout", ["new", "old"])
def test_llama3_rope_scaling_matches_transformers_past_original_context(tmp_path, layout):
    # 600 tokens: well past original_max_position_embeddings (64) of the config
    _check_against_hf(tmp_path, LLAMA3_ROPE, layout, prompt_len=600)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    _check_against_hf(tmp_path, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, "new",
                      prompt_len=300, tie=False)


def test_llama3_scaling_changes_the_logits(tmp_path):
    """The comparison above can tell scaled from unscaled frequencies at this length."""
    hf = build_llama(tmp_path / "ckpt", rope=LLAMA3_ROPE)
    plain = build_llama(tmp_path / "plain", rope={"rope_type": "default", "rope_theta": 500000.0})
    ids = _prompt(300, hf.config.vocab_size)
    assert (hf_logits(hf, ids) - hf_logits(plain, ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_unimplemented_rope_type_is_refused_naming_type_and_file(tmp_path, rope_type):
    build_llama(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"] = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: rope type '{rope_type}' is not supported"):
        shape_from_hf_config(path)
    to_old_layout(path)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + f".*'{rope_type}'"):
        shape_from_hf_config(path)
