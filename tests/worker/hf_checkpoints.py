"""Random tiny Llama checkpoints written by Hugging Face transformers, for the
worker's checkpoint tests. Nothing is downloaded: the weights are random and
the directory is a temp dir.

Not a test module (no test_ prefix).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def build_llama(directory: Path, *, rope: dict | None = None, layout: str = "new", vocab_size: int = 300,
                tie: bool = True, seed: int = 0, **extra) -> "transformers.LlamaForCausalLM":
    """Save a random GQA Llama (4 query heads, 2 kv heads, head_dim 16) to directory.

    rope: the rope parameters (with rope_theta), default plain RoPE at theta 500000.
    layout "new" keeps transformers 5's config.json (rope_parameters); "old"
    rewrites it the transformers 4 way (top-level rope_theta + rope_scaling).
    initializer_range is large so that greedy choices are not near-ties.
    """
    rope = dict(rope or {"rope_type": "default", "rope_theta": 500000.0})
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters=rope, tie_word_embeddings=tie, initializer_range=0.2, **extra)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if layout == "old":
        to_old_layout(directory / "config.json")
    return model


def to_old_layout(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else params
    config_path.write_text(json.dumps(cfg, indent=2))


def hf_logits(model, ids: list[int]) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' own generate() (its KV cache), no early stop."""
    with torch.no_grad():
        x = torch.tensor([ids])
        # an explicit mask: generate() would otherwise treat prompt tokens equal to pad_token_id as padding
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
