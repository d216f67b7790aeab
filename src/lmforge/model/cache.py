"""The KV-cache interface through which incremental decoding drives the model.

The model never owns cache storage: a caller (``generate``, the inference engine) creates a cache and
passes it to ``Transformer.forward(..., cache=cache)``. Each attention layer hands the cache its new
keys/values with their absolute positions and gets back every key/value the new queries may see.
Masks (causal, sliding window, sparse pattern, prefix) and position biases (ALiBi, relative buckets)
are computed from query and key positions, so the same attention code serves a contiguous cache,
a paged cache with per-sequence lengths, and a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lmforge.model.config import ModelConfig


@dataclass
class KVView:
    """Keys/values visible to the current queries of one layer.

    keys, values: (batch, n_kv_heads, n_keys, head_dim)
    positions: (batch, n_keys) absolute position of each key; -1 marks an empty/padded slot.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor


class KVCache(Protocol):
    """What attention layers call. A cache that also has ``lengths() -> (batch,) LongTensor`` (where each
    sequence continues) lets ``Transformer.forward`` default ``position_ids``; otherwise callers pass them."""

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        """Store new keys/values (batch, n_kv_heads, n_new, head_dim) at ``positions`` (batch, n_new)
        and return what the new queries of this layer may attend to."""
        ...


class ContiguousKVCache:
    """A simple preallocated cache: sequence i's keys live at slots ``0 .. length[i]-1``.

    Positions of new tokens must continue each sequence (the slot of a key is its position), which is
    what plain left-to-right generation does. Empty slots report position -1. New tokens at position -1
    (padding in a ragged batch) are written to a spare slot past ``max_len`` that is never returned.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((n_layers, batch, max_len + 1), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.used = [0] * n_layers  # per layer, one past the highest stored position
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), self.pos.unbind(0)))

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> ContiguousKVCache:
        """A cache shaped for ``cfg`` (all its layers, its key/value heads)."""
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len, dtype=dtype, device=device)

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {top} exceeds the cache length {self.max_len}")
        k, v, pos = self._layers[layer]
        slots = torch.where(positions < 0, self.max_len, positions)
        index = slots[:, None, :, None].expand_as(keys)
        k.scatter_(2, index, keys.to(k.dtype))
        v.scatter_(2, index, values.to(v.dtype))
        pos.scatter_(1, slots, positions)  # the spare slot only ever receives -1
        self.used[layer] = used = max(self.used[layer], top + 1)
        return KVView(k[:, :, :used], v[:, :, :used], pos[:, :used])

    def lengths(self) -> Tensor:
        """Per sequence, one past the last stored position (layer 0): where the next token goes."""
        return self.pos[0, :, : self.max_len].amax(dim=-1) + 1

    def length(self) -> int:
        """Number of positions stored for layer 0 (the longest sequence)."""
        return self.used[0]
