"""Recurrent state for the engine's Mamba layers: one fixed-size slot per running sequence, not KV blocks.

A Mamba layer's state after any number of tokens is its convolution window and its SSM state, so a
sequence's memory is constant in its length. ``StatePool`` holds those of every Mamba layer for up to
``max_num_seqs`` sequences; a sequence takes a slot when its first chunk is scheduled (the slot is zeroed)
and gives it back once it no longer runs (finished, aborted, failed or preempted: a preempted sequence starts
over from its first token). ``HybridCache`` is the cache the model sees in a forward: attention layers go to
the paged KV cache (which holds only those layers), Mamba layers read and write the slots of the batch's
rows. The model's padding positions are -1, which leave a row's state untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.infer.kv_cache import PagedKVCache
from lmforge.model.cache import KVView


class StatePool:
    def __init__(self, cfg, max_seqs: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = [i for i in range(cfg.n_layers) if cfg.layer_type(i) == "mamba"]
        index = {layer: i for i, layer in enumerate(self.layers)}
        self.index = index
        n = len(self.layers)
        self.conv = torch.zeros(n, max_seqs, cfg.mamba_d_inner, cfg.mamba_d_conv, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            n, max_seqs, cfg.mamba_d_inner, cfg.mamba_d_state, dtype=torch.float32, device=device
        )
        self.free = list(range(max_seqs - 1, -1, -1))
        self.slot_of: dict[int, int] = {}  # seq_id -> slot

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def slot(self, seq_id: int, fresh: bool) -> int:
        """The sequence's slot (taken if it has none); ``fresh`` zeroes it (a first chunk)."""
        slot = self.slot_of.get(seq_id)
        if slot is None:
            slot = self.slot_of[seq_id] = self.free.pop()
            fresh = True
        if fresh:
            self.conv[:, slot].zero_()
            self.ssm[:, slot].zero_()
        return slot

    def retain(self, seq_ids: set[int]) -> None:
        """Give back the slots of every sequence not in ``seq_ids``."""
        for seq_id in [s for s in self.slot_of if s not in seq_ids]:
            self.free.append(self.slot_of.pop(seq_id))


class HybridCache:
    """The forward's cache for a model with Mamba layers: paged KV for its attention layers (numbered
    among the attention layers only), pool slots for its Mamba layers (``bind`` sets the rows' slots)."""

    def __init__(self, cfg, paged: PagedKVCache, pool: StatePool) -> None:
        self.paged, self.pool = paged, pool
        attention = [i for i in range(cfg.n_layers) if cfg.layer_type(i) == "attention"]
        self.attn_index = {layer: i for i, layer in enumerate(attention)}
        self.rows: Tensor | None = None

    def bind(self, slots: list[int], device: torch.device) -> None:
        self.rows = torch.tensor(slots, dtype=torch.long, device=device)

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        return self.paged.update(self.attn_index[layer], keys, values, positions)

    def mamba_state(self, layer: int) -> tuple[Tensor, Tensor]:
        i = self.pool.index[layer]
        return self.pool.conv[i].index_select(0, self.rows), self.pool.ssm[i].index_select(0, self.rows)

    def set_mamba_state(self, layer: int, state: tuple[Tensor, Tensor], positions: Tensor) -> None:
        i = self.pool.index[layer]
        self.pool.conv[i].index_copy_(0, self.rows, state[0].to(self.pool.conv.dtype))
        self.pool.ssm[i].index_copy_(0, self.rows, state[1].float())
