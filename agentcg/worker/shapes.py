"""Model shapes: the numbers that define a Llama-family decoder.

Named shapes build randomly initialised models (nothing is downloaded); a
checkpoint directory's config.json maps onto the same dataclass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from agentcg.worker.rope import RopeScaling, rope_from_hf_config


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_positions: int = 131072
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()      # any of them ends a generation
    rope_scaling: RopeScaling = RopeScaling()

    @property
    def eos_token_id(self) -> int | None:
        """The first end token (the one a tokenizer without its own uses)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * elem_bytes

    def param_count(self) -> int:
        hd = self.head_dim
        per_layer = (self.dim * (self.n_heads + 2 * self.n_kv_heads) * hd
                     + self.n_heads * hd * self.dim + 3 * self.dim * self.ffn_dim + 2 * self.dim)
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    def validate(self) -> None:
        for field_name in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"shape {self.name!r}: {field_name} must be positive, "
                                 f"got {getattr(self, field_name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"shape {self.name!r}: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"shape {self.name!r}: n_heads {self.n_heads} is not a multiple of "
                             f"n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"shape {self.name!r}: head_dim {self.head_dim} must be even for RoPE")


SHAPES: dict[str, ModelShape] = {
    # CPU tests: byte-level vocabulary (256 bytes + BOS, EOS, PAD)
    "tiny": ModelShape("tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       vocab_size=259, rope_theta=10000.0, max_positions=8192,
                       bos_token_id=256, eos_token_ids=(257,)),
    # a little deeper, still CPU-sized
    "small": ModelShape("small", n_layers=4, dim=256, n_heads=8, n_kv_heads=2, ffn_dim=768,
                        vocab_size=259, rope_theta=10000.0, max_positions=32768,
                        bos_token_id=256, eos_token_ids=(257,)),
    "llama3-8b": ModelShape("llama3-8b", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8,
                            ffn_dim=14336, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                            max_positions=131072, bos_token_id=128000, eos_token_ids=(128001,)),
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(sorted(SHAPES))} "
                         f"(or pass a checkpoint directory)") from None


def shape_from_hf_config(path: Path) -> ModelShape:
    """Read a Hugging Face Llama-style config.json (and generation_config.json next to it)."""
    cfg = json.loads(Path(path).read_text())
    arch = cfg.get("model_type", "llama")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{path}: model_type {arch!r} is not a Llama-family decoder")
    rope_theta, rope_scaling = rope_from_hf_config(cfg, path)
    shape = ModelShape(
        name=Path(path).parent.name,
        n_layers=int(cfg["num_hidden_layers"]),
        dim=int(cfg["hidden_size"]),
        n_heads=int(cfg["num_attention_heads"]),
        n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        max_positions=int(cfg.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=end_token_ids(Path(path)),
        rope_scaling=rope_scaling,
    )
    if cfg.get("head_dim") not in (None, shape.head_dim):
        raise ValueError(f"{path}: head_dim {cfg['head_dim']} != hidden_size/num_attention_heads")
    shape.validate()
    return shape


def end_token_ids(config_path: Path) -> tuple[int, ...]:
    """A checkpoint's end-of-sequence ids: generation_config.json's (what
    transformers' generate() stops on) then config.json's, each an int or a list."""
    ids: list[int] = []
    for path in (config_path.parent / "generation_config.json", config_path):
        if not path.exists():
            continue
        val = json.loads(path.read_text()).get("eos_token_id")
        vals = val if isinstance(val, list) else [] if val is None else [val]
        for v in vals:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {val!r}")
            if v not in ids:
                ids.append(v)
    return tuple(ids)


def with_vocab(shape: ModelShape, vocab_size: int) -> ModelShape:
    return replace(shape, vocab_size=vocab_size)
