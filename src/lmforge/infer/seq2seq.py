"""Encoder-decoder (T5) models in the engine: the decoder runs as the engine's sequences, its self-attention
in the paged KV cache; each request's source is encoded once and its cross-attention keys/values kept here.

A request's prompt is its source. Its sequence starts with the decoder start token (its one "prompt" token),
so everything the engine does for a decoder (continuous batching, sampling, stop conditions, streaming)
applies unchanged; what differs is the forward: ``CrossAttention.ensure`` encodes the sources of sequences
seen for the first time (one padded batch), and the runner calls ``T5Model.decode_rows`` with the batch's
cross-attention keys/values gathered from here (padded to the longest source, masked). The encoder output is
not kept, only the per-layer projections every decoding step needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.infer.kv_cache import PagedKVCache
from lmforge.infer.sequence import Sequence


class CrossAttention:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.kv: dict[int, list[tuple[Tensor, Tensor]]] = {}  # seq_id -> per layer (heads, n_src, head_dim)

    @torch.inference_mode()
    def ensure(self, seqs: list[Sequence], device: torch.device) -> None:
        """Encode the sources of the sequences that have no cross-attention state yet (one padded batch)."""
        new = [s for s in seqs if s.seq_id not in self.kv]
        if not new:
            return
        width = max(len(s.source_ids) for s in new)
        ids = torch.zeros(len(new), width, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for b, seq in enumerate(new):
            ids[b, : len(seq.source_ids)] = torch.tensor(seq.source_ids)
            mask[b, : len(seq.source_ids)] = 1
        ids, mask = ids.to(device), mask.to(device)
        cross = self.model.start_decoding(self.model.encode(ids, mask), mask).cross_kv
        for b, seq in enumerate(new):
            n = len(seq.source_ids)
            self.kv[seq.seq_id] = [(k[b, :, :n], v[b, :, :n]) for k, v in cross]

    def gather(self, seqs: list[Sequence]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """The rows' keys/values per layer (batch, heads, longest source, head_dim) and the source mask."""
        states = [self.kv[s.seq_id] for s in seqs]
        width = max(layers[0][0].shape[1] for layers in states)
        first = states[0][0][0]
        mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=first.device)
        layers = []
        for layer in range(len(states[0])):
            k = first.new_zeros(len(seqs), first.shape[0], width, first.shape[2])
            v = torch.zeros_like(k)
            for b, per_layer in enumerate(states):
                n = per_layer[layer][0].shape[1]
                k[b, :, :n], v[b, :, :n] = per_layer[layer]
                mask[b, :n] = True
            layers.append((k, v))
        return layers, mask

    def retain(self, seq_ids: set[int]) -> None:
        for seq_id in [s for s in self.kv if s not in seq_ids]:
            del self.kv[seq_id]


class PagedSelfAttention:
    """The decoder's self-attention keys/values through the paged cache (``append`` as T5's blocks call it)."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    def append(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        view = self.cache.update(layer, keys, values, torch.empty(0))
        return view.keys, view.values
