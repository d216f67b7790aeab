"""Paged KV cache: the storage behind the block manager, speaking the model's ``KVCache`` protocol.

Keys and values of every layer live in flat slot arrays ``[num_blocks * block_size, n_kv_heads, head_dim]``.
Before each forward the model runner calls :meth:`PagedKVCache.bind` with where the new tokens go (``slot_mapping``)
and which slots each batch row may read (its block table expanded to slots, padded with the null block). A layer's
``update`` scatters the new keys/values into their slots and gathers every row's blocks into the padded
``[B, n_kv_heads, S, head_dim]`` view the model attends over. Slot ``j`` of a row's view holds the row's token
``j``, so the view's key positions are simply ``0..context_len-1`` with -1 after the end.

That gather copies every visible key and value once per layer and step, which on a CPU costs more than the
attention itself. :class:`DecodeMirror` removes it for decoding: each decoding sequence keeps a contiguous copy
of its keys/values in a row of a ``[rows, n_kv_heads, length, head_dim]`` buffer, filled from the pool once when
the sequence starts decoding and then extended by one token per step. The pool stays the source of truth
(prefix cache, forks, preemption, prefill); the mirror trades memory for decode speed and can be turned off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.model.cache import KVView


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
        self.mirror = DecodeMirror(self)

    def bind_mirrored(self, slot_mapping: Tensor, token_positions: Tensor, view_positions: Tensor) -> None:
        """Set up a decode forward whose rows 0..B-1 are the mirror's rows (see :meth:`DecodeMirror.arrange`)."""
        self._slot_mapping = slot_mapping
        self._token_rows = None
        self._view_slots = None
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
            return self.mirror.update(layer, keys, values, self._mirror_positions, self._view_positions)
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
        src = torch.cat([torch.arange(s * bs, (s + 1) * bs) for s, _ in copies])
        dst = torch.cat([torch.arange(d * bs, (d + 1) * bs) for _, d in copies])
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class DecodeMirror:
    """Contiguous copies of the decoding sequences' keys/values: row ``i`` serves batch row ``i``."""

    ROW_GROWTH = 8
    LENGTH_GROWTH = 256

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.k: Tensor | None = None  # (n_layers, rows, n_kv_heads, length, head_dim)
        self.v: Tensor | None = None
        self.row_of: dict[int, int] = {}  # seq id -> row
        self.row_seq: list[int] = []  # row -> seq id
        self.row_len: list[int] = []  # tokens mirrored in each row

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def _grow(self, rows: int, length: int) -> None:
        have_rows, have_len = (0, 0) if self.k is None else (self.k.shape[1], self.k.shape[3])
        if rows <= have_rows and length <= have_len:
            return
        rows = max(have_rows, -(-rows // self.ROW_GROWTH) * self.ROW_GROWTH)
        length = max(have_len, -(-length // self.LENGTH_GROWTH) * self.LENGTH_GROWTH)
        layers, _, heads, dim = self.cache.k.shape
        k = self.cache.k.new_zeros(layers, rows, heads, length, dim)
        v = self.cache.v.new_zeros(layers, rows, heads, length, dim)
        if self.k is not None:
            k[:, :have_rows, :, :have_len] = self.k
            v[:, :have_rows, :, :have_len] = self.v
        self.k, self.v = k, v

    def _release(self, row: int) -> None:
        """Free a row, moving the last row into it so that rows stay 0..n-1."""
        assert self.k is not None and self.v is not None
        del self.row_of[self.row_seq[row]]
        last = len(self.row_seq) - 1
        if row != last:
            n = self.row_len[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.row_seq[row], self.row_len[row] = self.row_seq[last], self.row_len[last]
            self.row_of[self.row_seq[row]] = row
        self.row_seq.pop()
        self.row_len.pop()

    def arrange(self, seq_ids: list[int], block_tables: list[list[int]], computed: list[int]) -> list[int]:
        """Give each decoding sequence a row, filled from the pool up to its ``computed`` tokens; rows of
        sequences no longer decoding are released. Returns the batch order: the input index for each row."""
        present = set(seq_ids)
        row = 0
        while row < len(self.row_seq):
            if self.row_seq[row] in present:
                row += 1
            else:
                self._release(row)
        self._grow(len(seq_ids), max(computed) + 1)
        assert self.k is not None and self.v is not None
        bs = self.cache.block_size
        for seq_id, table, done in zip(seq_ids, block_tables, computed):
            if seq_id not in self.row_of:
                self.row_of[seq_id] = len(self.row_seq)
                self.row_seq.append(seq_id)
                self.row_len.append(0)
            row = self.row_of[seq_id]
            start = min(self.row_len[row], done)
            if start < done:  # keys/values this row lacks (a new decoder): copy them from the pool once
                pos = torch.arange(start, done)
                slots = torch.tensor(table)[pos // bs] * bs + pos % bs
                self.k[:, row, :, start:done] = self.cache.k[:, slots].transpose(1, 2)
                self.v[:, row, :, start:done] = self.cache.v[:, slots].transpose(1, 2)
            self.row_len[row] = done + 1  # the token decoded now is written by update()
        return sorted(range(len(seq_ids)), key=lambda i: self.row_of[seq_ids[i]])

    def update(
        self, layer: int, keys: Tensor, values: Tensor, token_positions: Tensor, view_positions: Tensor
    ) -> KVView:
        assert self.k is not None and self.v is not None
        batch = keys.shape[0]
        rows = torch.arange(batch)
        self.k[layer][rows, :, token_positions] = keys[:, :, 0].to(self.k.dtype)
        self.v[layer][rows, :, token_positions] = values[:, :, 0].to(self.v.dtype)
        width = view_positions.shape[1]
        return KVView(self.k[layer, :batch, :, :width], self.v[layer, :batch, :, :width], view_positions)
