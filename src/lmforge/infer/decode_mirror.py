"""Decode mirror: contiguous copies of the decoding sequences' keys/values, so a decode step gathers nothing.

Reading a sequence's keys/values out of its paged blocks costs a full copy of them per layer and step, more
than the attention over them on a CPU. Instead each decoding sequence owns a row of a
``[rows, n_kv_heads, length, head_dim]`` buffer per layer, filled from the pool once when it starts decoding
and extended by one token per step; batch row ``i`` of a decode forward attends over buffer row ``i`` with no
copy. The pool stays the source of truth (prefix cache, forks, preemption, prefill), so a row can always be
rebuilt; a sequence that stops decoding (finished, preempted, aborted) releases its row at the next step.

Rows live in a few bins, each with its own buffer and decode forward. Every row of a forward attends over the
bin's longest context, and all contexts grow by one token per step, so a bin's padding is fixed when its rows
join: a new decoder goes to the bin where it adds the least padding, or opens a new bin when that padding
would cost more than a forward. The mirror trades memory (about the KV of the decoding sequences, again) for
speed. It never takes more than ``max_bytes`` (the engine passes the block pool's size): when a step would
need more, that step's decodes gather from the pool instead, and the rows catch up from the pool once they
fit again. ``EngineConfig.decode_mirror=False`` turns it off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.infer.kv_cache import PagedKVCache
from lmforge.model.cache import KVView


class MirrorBin:
    """One contiguous buffer; rows 0..n-1 are in use and serve batch rows 0..n-1 of the bin's forward."""

    MIN_LENGTH = 128

    def __init__(self, cache: PagedKVCache, min_rows: int = 8) -> None:
        self.cache = cache
        self.min_rows = min_rows  # first allocation: room for every sequence that can decode at once
        self.k: Tensor | None = None  # (n_layers, rows, n_kv_heads, length, head_dim)
        self.v: Tensor | None = None
        self.row_of: dict[int, int] = {}  # seq id -> row
        self.row_seq: list[int] = []  # row -> seq id
        self.row_len: list[int] = []  # tokens mirrored in each row

    @property
    def num_rows(self) -> int:
        return len(self.row_seq)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def planned_shape(self, rows: int, length: int, growth: str = "double") -> tuple[int, int]:
        """(rows, length) the buffer will have after growing to hold ``rows`` x ``length``. Every reallocation
        copies the whole buffer, so growth doubles; near the memory limit the buffer first gives up its unused
        rows and doubles the length ("fit_rows"), then rounds the length up to ``MIN_LENGTH`` ("round"), and
        only as a last resort takes just what is needed ("exact": a reallocation per step while it lasts).

        Pre-sized rows that no sequence uses must not pin the buffer at the limit: keeping them made every
        step past it reallocate (and zero) the whole buffer for one more token, 5x the cost of the step."""
        have_rows, have_len = (0, 0) if self.k is None else (self.k.shape[1], self.k.shape[3])
        if rows <= have_rows and length <= have_len:
            return have_rows, have_len
        if growth == "double":
            return max(rows, 2 * have_rows, self.min_rows), max(length, 2 * have_len, self.MIN_LENGTH)
        if growth == "fit_rows":
            return rows, max(length, 2 * have_len, self.MIN_LENGTH)
        if growth == "round":
            return rows, max(-(-length // self.MIN_LENGTH) * self.MIN_LENGTH, have_len)
        return rows, max(length, have_len)

    def bytes_for(self, shape: tuple[int, int]) -> int:
        layers, _, heads, dim = self.cache.k.shape
        return 2 * layers * shape[0] * heads * shape[1] * dim * self.cache.k.element_size()

    def grow(self, shape: tuple[int, int]) -> None:
        have_rows, have_len = (0, 0) if self.k is None else (self.k.shape[1], self.k.shape[3])
        if shape == (have_rows, have_len):
            return
        layers, _, heads, dim = self.cache.k.shape
        k = self.cache.k.new_zeros(layers, shape[0], heads, shape[1], dim)
        v = self.cache.v.new_zeros(layers, shape[0], heads, shape[1], dim)
        if self.k is not None and self.v is not None:
            keep = min(have_rows, shape[0])  # rows past num_rows (unused) may be dropped: see planned_shape
            k[:, :keep, :, :have_len] = self.k[:, :keep]
            v[:, :keep, :, :have_len] = self.v[:, :keep]
        self.k, self.v = k, v

    def add(self, seq_id: int) -> None:
        self.row_of[seq_id] = len(self.row_seq)
        self.row_seq.append(seq_id)
        self.row_len.append(0)

    def release(self, seq_id: int) -> None:
        """Free the sequence's row, moving the last row into it so that rows stay 0..n-1."""
        row = self.row_of.pop(seq_id)
        last = len(self.row_seq) - 1
        if row != last:
            n = self.row_len[last]
            if n:
                assert self.k is not None and self.v is not None
                self.k[:, row, :, :n] = self.k[:, last, :, :n]
                self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.row_seq[row], self.row_len[row] = self.row_seq[last], self.row_len[last]
            self.row_of[self.row_seq[row]] = row
        self.row_seq.pop()
        self.row_len.pop()

    def fill(self, seq_id: int, block_table: list[int], computed: int) -> None:
        """Copy from the pool whatever of the sequence's first ``computed`` tokens the row lacks."""
        assert self.k is not None and self.v is not None
        row = self.row_of[seq_id]
        start = min(self.row_len[row], computed)
        if start < computed:
            bs = self.cache.block_size
            pos = torch.arange(start, computed)
            slots = (torch.tensor(block_table)[pos // bs] * bs + pos % bs).to(self.k.device)
            self.k[:, row, :, start:computed] = self.cache.k[:, slots].transpose(1, 2)
            self.v[:, row, :, start:computed] = self.cache.v[:, slots].transpose(1, 2)
        self.row_len[row] = computed + 1  # the token decoded now is written by update()

    def update(
        self, layer: int, keys: Tensor, values: Tensor, token_positions: Tensor, view_positions: Tensor
    ) -> KVView:
        assert self.k is not None and self.v is not None
        batch = keys.shape[0]
        rows = torch.arange(batch, device=keys.device)
        self.k[layer][rows, :, token_positions] = keys[:, :, 0].to(self.k.dtype)
        self.v[layer][rows, :, token_positions] = values[:, :, 0].to(self.v.dtype)
        width = view_positions.shape[1]
        return KVView(self.k[layer, :batch, :, :width], self.v[layer, :batch, :, :width], view_positions)


class DecodeMirror:
    def __init__(
        self,
        cache: PagedKVCache,
        max_bytes: int,
        max_rows: int = 8,
        max_bins: int = 4,
        forward_cost: int = 4096,
    ) -> None:
        """max_bytes: memory the buffers may take (beyond it, decoding falls back to gathering from the
        pool); max_rows: sequences that may decode at once (buffers start with that many rows when they
        can afford it); forward_cost: padded key slots (summed over rows) judged as costly as one more
        forward."""
        self.cache = cache
        self.max_bytes = max_bytes
        self.bins = [MirrorBin(cache, max_rows) for _ in range(max_bins)]
        self.forward_cost = forward_cost
        self.bin_of: dict[int, MirrorBin] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bins)

    def _choose_bin(self, context: int, contexts: dict[MirrorBin, list[int]]) -> MirrorBin:
        def added_padding(b: MirrorBin) -> float:
            rows = contexts[b]
            if not rows:
                return self.forward_cost
            longest = max(rows)
            return max(longest - context, 0) + len(rows) * max(context - longest, 0)

        return min(self.bins, key=added_padding)

    def arrange(
        self, seq_ids: list[int], block_tables: list[list[int]], computed: list[int]
    ) -> list[tuple[MirrorBin, list[int]]] | None:
        """Place every decoding sequence in a bin row (filled from the pool as needed) and release the rows
        of sequences that stopped decoding. Returns, per non-empty bin, the input indices in row order, or
        None when the buffers would outgrow ``max_bytes`` (rows then catch up from the pool later)."""
        present = set(seq_ids)
        for seq_id in [s for s in self.bin_of if s not in present]:
            self.bin_of.pop(seq_id).release(seq_id)
        contexts: dict[MirrorBin, list[int]] = {b: [] for b in self.bins}
        newcomers = []
        for i, seq_id in enumerate(seq_ids):
            if seq_id in self.bin_of:
                contexts[self.bin_of[seq_id]].append(computed[i] + 1)
            else:
                newcomers.append(i)
        for i in sorted(newcomers, key=lambda i: -computed[i]):
            target = self._choose_bin(computed[i] + 1, contexts)
            target.add(seq_ids[i])
            self.bin_of[seq_ids[i]] = target
            contexts[target].append(computed[i] + 1)
        shapes = self._planned_shapes(contexts)
        if shapes is None:
            return None
        batches = []
        for b in self.bins:
            if not contexts[b]:
                continue
            b.grow(shapes[b])
            members = [i for i in range(len(seq_ids)) if self.bin_of[seq_ids[i]] is b]
            for i in members:
                b.fill(seq_ids[i], block_tables[i], computed[i])
            batches.append((b, sorted(members, key=lambda i: b.row_of[seq_ids[i]])))
        return batches

    def _planned_shapes(
        self, contexts: dict[MirrorBin, list[int]]
    ) -> dict[MirrorBin, tuple[int, int]] | None:
        for growth in ("double", "fit_rows", "round", "exact"):
            shapes = {
                b: b.planned_shape(b.num_rows, max(rows), growth) if rows else b.planned_shape(0, 0)
                for b, rows in contexts.items()
            }
            if sum(b.bytes_for(shape) for b, shape in shapes.items()) <= self.max_bytes:
                return shapes
        return None
