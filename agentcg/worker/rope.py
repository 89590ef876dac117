"""Rotary position embedding (RoPE) settings of a checkpoint, and their frequencies.

A Hugging Face config.json carries them in one of two layouts:

    old (transformers 4.x):  "rope_theta": 500000.0,
                             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, ...} | null
    new (transformers 5.x):  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                 "factor": 8.0, ...}

Implemented types: "default" (plain RoPE), "linear" (positions divided by
`factor`) and "llama3" (Llama 3.1 frequency-dependent scaling). Any other type
is refused: running a model with the wrong frequencies gives fluent-looking
nonsense rather than an error, so silently falling back is never right.

Pure Python (no torch): the model turns the frequencies into its tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_THETA = 10000.0                 # transformers' default for Llama when the config has none
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


def rope_from_hf_config(cfg: dict, path: Path | str) -> tuple[float, RopeScaling]:
    """(theta, scaling) of a parsed config.json, whichever layout it uses."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{path}: rope_parameters must be an object, got {type(params).__name__}")
    if params is None:
        params = cfg.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{path}: rope_scaling must be an object or null, got {type(params).__name__}")
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    # transformers 4.x wrote the type as "type" before "rope_type"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported by this worker "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), RopeScaling()

    def need(key: str) -> Any:
        if key not in params:
            raise ValueError(f"{path}: rope type {rope_type!r} needs {key!r} in its rope parameters")
        return params[key]

    factor = float(need("factor"))
    if factor <= 0:
        raise ValueError(f"{path}: rope factor must be positive, got {factor}")
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor=factor)
    low, high = float(need("low_freq_factor")), float(need("high_freq_factor"))
    if not 0 < low < high:
        raise ValueError(f"{path}: llama3 rope needs 0 < low_freq_factor < high_freq_factor, "
                         f"got {low} and {high}")
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if original is None:
        raise ValueError(f"{path}: llama3 rope needs original_max_position_embeddings")
    return float(theta), RopeScaling("llama3", factor, low, high, int(original))


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> list[float]:
    """Angle per position of each rotated pair of a head (head_dim // 2 values)."""
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling.rope_type == "linear":
        return [f / scaling.factor for f in inv]
    if scaling.rope_type == "llama3":
        return [_llama3(f, scaling) for f in inv]
    return inv


def _llama3(inv_freq: float, s: RopeScaling) -> float:
    """Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and
    the band in between blends the two by where the wavelength falls in it."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_positions / s.low_freq_factor
    high_freq_wavelen = s.original_max_positions / s.high_freq_factor
    if wavelen < high_freq_wavelen:
        return inv_freq
    if wavelen > low_freq_wavelen:
        return inv_freq / s.factor
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
