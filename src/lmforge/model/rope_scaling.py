"""RoPE frequencies and their context-extension variants, named as transformers names them (``rope_type``).

Plain RoPE rotates dimension pair i at frequency theta_i = base^(-2i/d) (d = rotary dims). A model trained on
L positions has seen every angle p * theta_i only for p < L; the variants below change theta_i (and sometimes
scale the rotated q/k by an attention factor a, so q·k is scaled by a^2) so longer contexts look familiar.
With s = factor and L = original_max_position_embeddings (the training length):

- base modification: a larger ``rope_theta`` (e.g. NTK-aware fixed scaling, base * s^(d/(d-2))). No rope_type.
- ``linear`` (position interpolation, Chen et al. 2023): theta_i / s.
- ``dynamic`` (NTK-aware, recomputed per forward): base' = base * (s * n / L - (s - 1))^(d/(d-2)) with
  n = max(sequence length so far, L); L here is ``max_seq_len`` as in transformers.
- ``yarn`` (Peng et al. 2023): per pair, interpolate (theta_i / s) where the pair rotates fewer than beta_slow
  times over L, keep theta_i where it rotates more than beta_fast times, a linear ramp in between;
  a = attention_factor or 0.1 ln s + 1 (or the ratio of mscale / mscale_all_dim versions of it).
- ``llama3`` (Llama 3.1): wavelengths above L / low_freq_factor divided by s, below L / high_freq_factor kept,
  a smooth ramp between.
- ``longrope`` (Ding et al. 2024): theta_i / short_factor[i] while the sequence fits L, theta_i / long_factor[i]
  beyond it; a = attention_factor or sqrt(1 + ln s / ln L) with s = max_seq_len / L when factor is absent.
- ``truncate`` (base truncation, Pal et al. 2023 "Giraffe"): pairs whose wavelength 2 pi / theta_i exceeds L
  never completed a rotation in training; their frequency is clamped to rho (default 0: position-free).

``dynamic`` and ``longrope`` depend on the current sequence length n = max(position id) + 1 of the forward.
Like transformers, keys already in a KV cache keep the rotation of the step that computed them, so a cached
decode past L is not identical to a full forward at the final length (both are the same as in transformers).
A cache that stores keys before RoPE (``unrotated_keys``, e.g. ``SinkKVCache``) does better: every cached key
is rotated at the current frequencies, so q·k stays a function of the distance at every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig

LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_type(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_frequencies(
    cfg: ModelConfig, seq_len: int | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, float]:
    """(theta_i for the rotated pairs in fp32, attention factor a) for a forward whose longest sequence has
    ``seq_len`` positions (only ``dynamic`` and ``longrope`` look at it; None means "within training length")."""
    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    kind = rope_type(cfg)
    scaling = cfg.rope_scaling or {}
    original = scaling.get("original_max_position_embeddings") or cfg.max_seq_len
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "dynamic":
        n = max(seq_len or 0, cfg.max_seq_len)
        factor = scaling["factor"]
        base = cfg.rope_theta * (factor * n / cfg.max_seq_len - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, cfg, scaling, original)
    if kind == "llama3":
        return _llama3(inv_freq, scaling, original), 1.0
    if kind == "longrope":
        return _longrope(inv_freq, cfg, scaling, original, seq_len)
    if kind == "truncate":
        wavelength = 2 * math.pi / inv_freq
        return torch.where(wavelength > original, scaling.get("rho", 0.0), inv_freq), 1.0
    return inv_freq, 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: Tensor, cfg: ModelConfig, scaling: dict, original: int) -> tuple[Tensor, float]:
    """Pair i rotates r_i = L theta_i / (2 pi) times over the training length; it sits at (fractional) index
    i(r) = d ln(L / (2 pi r)) / (2 ln base). Pairs below i(beta_fast) keep theta_i, pairs above i(beta_slow)
    get theta_i / s, linearly in between (bounds floored/ceiled unless ``truncate`` is false)."""
    dim = cfg.rotary_dim
    factor = scaling.get("factor") or cfg.max_seq_len / original
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def index(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = index(scaling.get("beta_fast") or 32), index(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pairs = torch.arange(dim // 2, device=inv_freq.device, dtype=torch.float32)
    interpolated = ((pairs - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / factor * interpolated + inv_freq * (1 - interpolated), float(attention)


def _llama3(inv_freq: Tensor, scaling: dict, original: int) -> Tensor:
    """Wavelength w_i = 2 pi / theta_i: w_i > L / low -> theta_i / s; w_i < L / high -> theta_i; between,
    (1 - g) theta_i / s + g theta_i with g = (L / w_i - low) / (high - low)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    ramped = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor, ramped)


def _longrope(
    inv_freq: Tensor, cfg: ModelConfig, scaling: dict, original: int, seq_len: int | None
) -> tuple[Tensor, float]:
    factor = scaling.get("factor") or cfg.max_seq_len / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len and seq_len > original else "short_factor"
    ext = torch.tensor(scaling[key], dtype=torch.float32, device=inv_freq.device)
    return inv_freq / ext, float(attention)
