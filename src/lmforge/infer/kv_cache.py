"""Paged KV cache: the storage behind the block manager, speaking the model's ``KVCache`` protocol.

Keys and values of every layer live in flat slot arrays ``[num_blocks * block_size, n_kv_heads, head_dim]``.
Before each forward the model runner calls :meth:`PagedKVCache.bind` with where the new tokens go (``slot_mapping``)
and which slots each batch row may read (its block table expanded to slots, padded with the null block). A layer's
``update`` scatters the new keys/values into their slots and gathers every row's blocks into the padded
``[B, n_kv_heads, S, head_dim]`` view the model attends over. Slot ``j`` of a row's view holds the row's token
``j``, so the view's key positions are simply ``0..context_len-1`` with -1 after the end.

That gather copies every visible key and value once per layer and step, which on a CPU costs more than the
attention itself; decoding therefore reads from a :class:`~lmforge.infer.decode_mirror.DecodeMirror` instead
(:meth:`PagedKVCache.bind_mirrored`), while the pool stays the source of truth.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lmforge.model.cache import KVView


class DecodeRows(Protocol):
    """Contiguous copies of the decoding sequences' keys/values (a decode mirror's bin): appends a step's
    new keys/values and returns the view to attend over."""

    def update(
        self, layer: int, keys: Tensor, values: Tensor, token_positions: Tensor, view_positions: Tensor
    ) -> KVView: ...


def bytes_per_block(
    n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * block_size * n_kv_heads * head_dim * element


def num_blocks_for_budget(
    memory_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    """How many blocks (the padding block included) fit in ``memory_bytes`` of keys and values."""
    return memory_bytes // bytes_per_block(n_layers, n_kv_heads, head_dim, block_size, dtype)


class PagedKVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._slot_mapping: Tensor | None = None
        self._token_rows: Tensor | None = None
        self._view_slots: Tensor | None = None
        self._view_positions: Tensor | None = None
        self._mirror_positions: Tensor | None = None  # (B,) position of each decode token, mirror mode
        self._mirror_bin: DecodeRows | None = None

    def bind_mirrored(
        self, mirror_bin: DecodeRows, slot_mapping: Tensor, token_positions: Tensor, view_positions: Tensor
    ) -> None:
        """Set up a decode forward whose batch rows are the rows 0..B-1 of ``mirror_bin``."""
        self._slot_mapping = slot_mapping
        self._token_rows = None
        self._view_slots = None
        self._mirror_bin = mirror_bin
        self._mirror_positions = token_positions
        self._view_positions = view_positions

    def bind(
        self, slot_mapping: Tensor, token_rows: Tensor | None, view_slots: Tensor, view_positions: Tensor
    ) -> None:
        """Set up the next forward.

        slot_mapping: (N,) cache slot of each real new token; token_rows: (N,) index of that token in the
        flattened (B * T) input, or None when every input position is real; view_slots: (B, S) slots each row
        reads; view_positions: (B, S) position of each viewed key, -1 past the row's context.
        """
        self._slot_mapping = slot_mapping
        self._token_rows = token_rows
        self._view_slots = view_slots
        self._mirror_positions = None
        self._view_positions = view_positions

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        if self._view_slots is None and self._mirror_positions is None:
            raise RuntimeError("PagedKVCache.update called before bind()")
        batch, heads, new, dim = keys.shape
        flat_keys = keys.transpose(1, 2).reshape(batch * new, heads, dim)
        flat_values = values.transpose(1, 2).reshape(batch * new, heads, dim)
        if self._token_rows is not None:
            flat_keys = flat_keys.index_select(0, self._token_rows)
            flat_values = flat_values.index_select(0, self._token_rows)
        self.k[layer].index_copy_(0, self._slot_mapping, flat_keys.to(self.k.dtype))
        self.v[layer].index_copy_(0, self._slot_mapping, flat_values.to(self.v.dtype))
        if self._mirror_positions is not None:
            assert self._mirror_bin is not None
            return self._mirror_bin.update(layer, keys, values, self._mirror_positions, self._view_positions)
        # index_select on flat slot ids is much cheaper than advanced indexing with a (B, S) index
        rows, width = self._view_slots.shape
        flat = self._view_slots.reshape(-1)
        view_keys = self.k[layer].index_select(0, flat).view(rows, width, heads, dim).transpose(1, 2)
        view_values = self.v[layer].index_select(0, flat).view(rows, width, heads, dim).transpose(1, 2)
        return KVView(view_keys, view_values, self._view_positions)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write after a fork)."""
        if not copies:
            return
        bs = self.block_size
        dev = self.k.device
        src = torch.cat([torch.arange(s * bs, (s + 1) * bs) for s, _ in copies]).to(dev)
        dst = torch.cat([torch.arange(d * bs, (d + 1) * bs) for _, d in copies]).to(dev)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
