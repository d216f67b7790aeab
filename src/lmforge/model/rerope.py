"""ReRoPE and Leaky ReRoPE (Su 2023): position truncation of RoPE's relative distance, in two attention passes.

Within a window w the query-key distance d = i - j is used as is; beyond it it grows at 1/k (Leaky ReRoPE) or not
at all (ReRoPE, k = inf), so no distance past what training saw ever reaches the rotation:

    f(d) = d                   if d < w
    f(d) = w + (d - w) / k     otherwise  (= w for ReRoPE)

RoPE makes q·k depend on the difference of the two rotation positions, so f(i - j) = (w + (i - w)/k) - j/k is
realised by rotating q to w + (i - w)/k and k to j/k. That is a second set of scores: pass 1 rotates q, k to
i, j (plain RoPE), pass 2 as above, and each (i, j) takes pass 1 if d < w else pass 2. The scores are
materialised (no fused kernel), and keys are cached unrotated since both passes rotate them differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.model.positions import apply_rope, rope_cos_sin


@dataclass
class ReRoPE:
    """The two-pass attention of one forward: RoPE frequencies, attention factor, window w and leak k."""

    inv_freq: Tensor
    attention_factor: float
    window: int
    leak: float | None = None  # k; None -> plain ReRoPE (distances clamp at w)

    def relative(self, distance: Tensor) -> Tensor:
        """f(d): the distance RoPE sees for a true distance d (>= 0)."""
        grown = (
            self.window + (distance - self.window) / self.leak
            if self.leak
            else torch.full_like(distance, self.window, dtype=torch.float32)
        )
        return torch.where(distance < self.window, distance.float(), grown)

    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return apply_rope(
            x, *(t.to(x.dtype) for t in rope_cos_sin(positions, self.inv_freq, self.attention_factor))
        )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        mask: Tensor,
        dropout: float = 0.0,
    ) -> Tensor:
        """Attention output (batch, heads, n_q, head_dim) of unrotated q (batch, heads, n_q, head_dim) and k, v
        (batch, kv_heads, n_k, head_dim) at absolute positions q_pos, k_pos; mask: (batch, 1, n_q, n_k) bool;
        dropout on the attention weights (training)."""
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        inner = self._rotate(q, q_pos) @ self._rotate(k, k_pos).transpose(-1, -2)
        slope = 1.0 / self.leak if self.leak else 0.0
        q_far = self.window + (q_pos - self.window) * slope
        outer = self._rotate(q, q_far) @ self._rotate(k, k_pos * slope).transpose(-1, -2)
        near = (q_pos[:, :, None] - k_pos[:, None, :] < self.window)[:, None]
        scores = torch.where(near, inner, outer).float() / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        if dropout > 0:
            weights = F.dropout(weights, dropout)
        return weights.to(v.dtype) @ v
