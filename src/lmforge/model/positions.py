"""Position information: absolute (learned, sinusoidal), rotary (RoPE), and attention biases (ALiBi, T5 buckets).

Everything here is a function of absolute position ids, never of a token's index in the tensor, so the
same code serves a full forward, a KV cache (queries at positions n.., keys at 0..n), packed documents
(positions restart per document) and padded batches (position -1 marks padding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmforge.model.config import ModelConfig


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim))."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions, added to the token embeddings (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, positions: Tensor) -> Tensor:
        return sinusoidal_embedding(positions.clamp(min=0), self.dim)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """a·cos/a·sin tables (batch, 1, seq, rotary_dim) for ``apply_rope``, in fp32 (a: the attention factor of
    YaRN / LongRoPE, see ``lmforge.model.rope_scaling``; it scales q·k by a^2)."""
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rotary_dim dims of x (batch, heads, seq, head_dim) in the half-split layout (GPT-NeoX,
    HF Llama): pairs are (i, i + rotary_dim/2), so q·k depends only on the position difference."""
    rot = cos.shape[-1]
    x_rot = x if rot == x.shape[-1] else x[..., :rot]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n * h) for the nearest power of two
    n <= n_heads, then the odd powers of the 2n sequence for the remaining heads."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (h + 1) for h in range(closest)]
    if closest < n_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base**p for p in range(1, 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Linear distance penalty -slope * |q - k|, shape (batch, heads, n_q, n_k)."""
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()
    return -slopes.to(q_pos.device)[None, :, None, None] * distance[:, None]


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of (key - query) offsets: exact buckets for small distances, log-spaced up to
    max_distance, one bucket beyond. Bidirectional halves the buckets between the two directions."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head) added to the attention logits (Raffel et al. 2020).

    Each layer owns its table (T5 shares the first layer's), which keeps blocks self-contained for pipeline
    stages that hold only some of them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.bidirectional = cfg.structure == "prefix"
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        relative = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(0, 3, 1, 2)
