"""Attention sinks (StreamingLLM, Xiao et al. 2024): a KV cache that keeps the first ``sink`` tokens and the
most recent ``window`` ones, evicting the middle, so generation runs on with bounded memory.

Positions are those inside the cache, not in the stream: the kept tokens sit at 0 .. n-1 and the next token at
n, however many tokens were evicted. For that re-positioning to be exact, keys are stored *before* RoPE and
rotated by attention at the positions this cache reports (``unrotated_keys``); a layer therefore sees exactly
what a forward over the kept tokens at positions 0 .. n-1 would give its attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.model.cache import KVView


class SinkKVCache:
    """Per layer, unrotated keys and values (batch, n_kv_heads, n, head_dim); at most sink + window kept
    between forwards. A batch's sequences advance together (no padding)."""

    unrotated_keys = True  # attention rotates the keys it gets back, at the positions reported

    def __init__(self, n_layers: int, sink: int, window: int) -> None:
        if sink < 0 or window <= 0:
            raise ValueError(f"sink must be >= 0 and window > 0, got sink={sink}, window={window}")
        self.sink, self.window = sink, window
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def length(self) -> int:
        """Tokens kept (layer 0): where the next token is positioned."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def lengths(self) -> Tensor:
        return torch.tensor([self.length()])

    def _evict(self, x: Tensor) -> Tensor:
        n = x.shape[2]
        if n <= self.sink + self.window:
            return x
        return torch.cat((x[:, :, : self.sink], x[:, :, n - self.window :]), dim=2)

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        """Append the new (unrotated) keys/values after the kept ones, return them all at positions 0 .. n-1,
        then evict down to sink + window for the next forward."""
        kept = 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        expected = torch.arange(kept, kept + keys.shape[2], device=positions.device)
        if not torch.equal(positions, expected.expand_as(positions)):
            raise ValueError(f"positions must continue the kept tokens at {kept} (use the cache's lengths())")
        if self.keys[layer] is not None:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = self._evict(keys), self._evict(values)
        all_positions = torch.arange(keys.shape[2], device=keys.device).expand(keys.shape[0], -1)
        return KVView(keys, values, all_positions)
