"""Named architectures: the published shapes of GPT-2, Llama 2/3, Mistral, Qwen2 and Mixtral, and tiny test models."""

from __future__ import annotations

import copy
from typing import Any

from lmforge.model.config import ModelConfig

_GPT2 = dict(
    vocab_size=50257,
    max_seq_len=1024,
    norm="layernorm",
    mlp="gelu_tanh",
    position="learned",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope")
_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_MISTRAL = dict(
    _LLAMA,
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    d_ff=14336,
    max_seq_len=32768,
)
_TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "llama2-7b": dict(
        _LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096
    ),
    # Llama 3.1 8B: GQA, 128k vocabulary, theta 500k and the llama3 RoPE scaling to a 128k context
    "llama3-8b": dict(
        _LLAMA,
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
    ),
    "mistral-7b": dict(_MISTRAL, attention="sliding", sliding_window=4096),  # v0.1
    "qwen2-7b": dict(
        _LLAMA,
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        d_ff=18944,
        max_seq_len=32768,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qkv_bias=True,
    ),
    "qwen2-1.5b": dict(
        _LLAMA,
        vocab_size=151936,
        d_model=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        d_ff=8960,
        max_seq_len=32768,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
    ),
    "mixtral-8x7b": dict(_MISTRAL, rope_theta=1000000.0, n_experts=8, moe_top_k=2),
    "tiny-gpt2": dict(_GPT2, **{**_TINY, "n_kv_heads": 4, "d_ff": 256}),
    "tiny-llama": dict(_LLAMA, **_TINY),
    "tiny-mistral": dict(_LLAMA, **_TINY, attention="sliding", sliding_window=32),
    "tiny-qwen2": dict(_LLAMA, **_TINY, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
    "tiny-mixtral": dict(_LLAMA, **_TINY, n_experts=4, moe_top_k=2),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh ``ModelConfig`` for a named architecture, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(list_presets())}")
    return ModelConfig(**{**copy.deepcopy(PRESETS[name]), **overrides})
