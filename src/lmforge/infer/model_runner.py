"""Model runner: turns scheduled chunks into padded model inputs, runs the forwards, returns the needed logits.

Decoding sequences (one new token each) run as ``[B, 1]`` forwards over their decode-mirror rows (see
``decode_mirror.py``), or, when the mirror is off or full, gather their keys/values from the block pool.
Prefill chunks run as separate padded ``[B, T]`` forwards, so a long prefill never pads the decodes. Only the
rows whose logits are used (the last token of a completed chunk; every position when prompt logprobs are
asked for) go through the LM head: the model's ``logits_rows`` argument selects them, which saves a
``T x vocab`` matmul per prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.infer.cuda_graphs import DecodeGraphs
from lmforge.infer.decode_mirror import DecodeMirror
from lmforge.infer.kv_cache import PagedKVCache
from lmforge.infer.lora import LoraSet
from lmforge.infer.scheduler import ScheduledSeq
from lmforge.infer.seq2seq import CrossAttention, PagedSelfAttention
from lmforge.infer.sequence import Sequence
from lmforge.infer.state_pool import HybridCache


@dataclass
class ChunkLogits:
    """Logits a scheduled chunk produced: row ``row`` of ``block`` (a forward's ``[rows, vocab]`` logits) for
    its final token if it completes, ``all`` for every token of the chunk when prompt logprobs are collected.

    The row is kept as an index into its forward's block rather than sliced out, so that a step's sampling
    rows are gathered with one ``index_select`` per forward (:func:`stack_last`) instead of a view per row."""

    all: Tensor | None = None
    block: Tensor | None = None
    row: int = 0

    @property
    def last(self) -> Tensor | None:
        return None if self.block is None else self.block[self.row]


def stack_last(chunks: list[ChunkLogits]) -> Tensor:
    """The ``last`` logits of ``chunks`` (each must complete) as one ``[len(chunks), vocab]`` tensor, in the order
    given: a block whose rows are all taken in order is used as it is, others give one ``index_select`` each."""
    blocks: dict[int, tuple[Tensor, list[int], list[int]]] = {}
    for i, chunk in enumerate(chunks):
        assert chunk.block is not None
        entry = blocks.setdefault(id(chunk.block), (chunk.block, [], []))
        entry[1].append(chunk.row)
        entry[2].append(i)
    parts = [
        block
        if rows == list(range(block.shape[0]))
        else block.index_select(0, torch.tensor(rows, device=block.device))
        for block, rows, _ in blocks.values()
    ]
    order = [i for _, _, where in blocks.values() for i in where]
    if order == list(range(len(order))):  # the chunks follow their forwards' rows: no permutation
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts).index_select(0, inverse.to(parts[0].device))


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        cache: PagedKVCache,
        block_size: int,
        decode_mirror: bool = True,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device  # index tensors are built on the CPU, then moved here
        # the mirror may take as much memory as the block pool itself
        pool_bytes = 2 * cache.k.numel() * cache.k.element_size()
        self.mirror = DecodeMirror(cache, pool_bytes, max_num_seqs) if decode_mirror else None
        self.cache = cache
        self.block_size = block_size
        # padded key slots a decode batch may waste before it is split (about one forward's fixed cost)
        self.min_decode_bucket = 4096
        self.loras: LoraSet | None = None  # served LoRA adapters (set by the engine when it has some)
        self.prefix_lm = getattr(model.cfg, "structure", "causal") == "prefix"
        # attention sinks (sink tokens, window): a row sees its first sink tokens and its last window ones,
        # at positions counted inside what it sees (StreamingLLM); set by the engine
        self.sinks: tuple[int, int] | None = None
        self.state_cache: HybridCache | None = None  # a model with Mamba layers (set by the engine)
        self.graphs: DecodeGraphs | None = (
            None  # CUDA graphs of the mirrored decode forward (set by the engine)
        )
        self.cross: CrossAttention | None = None  # an encoder-decoder's sources (set by the engine)
        if getattr(model, "lm_head", None) is None:
            raise ValueError("the model runner needs a model with an lm_head")

    @torch.inference_mode()
    def execute(self, items: list[ScheduledSeq], all_logits: set[int]) -> list[ChunkLogits]:
        """Run the chunks; ``all_logits`` holds indices (into ``items``) that need logits at every position."""
        results = [ChunkLogits() for _ in items]
        decodes = [i for i, it in enumerate(items) if it.num_tokens == 1 and i not in all_logits]
        decode_set = set(decodes)
        prefills = [i for i in range(len(items)) if i not in decode_set]
        # Padding costs as much as real work on a CPU: prefill chunks are padded to the longest chunk of their
        # batch, and every row gathers and attends over the longest context of its batch. So both kinds are
        # split into batches of similar size; an extra forward costs little next to the padding it saves.
        context = [it.seq.num_computed + it.num_tokens for it in items]
        batches = _bucket(prefills, lambda i: items[i].num_tokens, 0)
        if decodes and not self._run_mirrored_decodes([items[i] for i in decodes], decodes, results):
            batches += _bucket(decodes, lambda i: context[i], self.min_decode_bucket)
        for batch in batches:
            self._run_batch([items[i] for i in batch], [i in all_logits for i in batch], batch, results)
        return results

    def _run_mirrored_decodes(
        self, items: list[ScheduledSeq], indices: list[int], results: list[ChunkLogits]
    ) -> bool:
        """One ``[B, 1]`` forward per mirror bin, attending over the bin's rows (no gather); False when the
        mirror is off or out of memory, and the decodes have to gather from the pool instead."""
        if self.mirror is None:
            return False
        bs = self.block_size
        seqs = [it.seq for it in items]
        batches = self.mirror.arrange(
            [s.seq_id for s in seqs], [s.block_table for s in seqs], [s.num_computed for s in seqs]
        )
        if batches is None:
            return False
        for mirror_bin, order in batches:
            rows = [seqs[i] for i in order]
            pos_list, id_list, slot_list = [], [], []
            for s in rows:  # one pass: the sequences' state lives in Python lists
                p = s.num_computed
                pos_list.append(p)
                id_list.append(s.token_ids[p])
                slot_list.append(s.block_table[p // bs] * bs + p % bs)
            graphed = None
            if self.graphs is not None and self.loras is None:
                graphed = self.graphs.run(mirror_bin, id_list, pos_list, slot_list)
            if graphed is not None:
                for row, i in enumerate(order):
                    result = results[indices[i]]
                    result.block, result.row = graphed, row
                continue
            dev = self.device
            # ids, positions and slots travel as one tensor (one host -> device copy)
            packed = torch.tensor([id_list, pos_list, slot_list]).to(dev)
            input_ids, positions, slots = packed[0], packed[1], packed[2]
            key_positions = torch.arange(max(pos_list) + 1, device=dev).expand(len(rows), -1)
            key_positions = torch.where(key_positions <= positions[:, None], key_positions, -1)
            self.cache.bind_mirrored(mirror_bin, slots, positions, key_positions)
            self._route(rows)
            logits = self.model(input_ids[:, None], position_ids=positions[:, None], cache=self.cache).logits
            block = logits[:, -1]
            for row, i in enumerate(order):
                result = results[indices[i]]
                result.block, result.row = block, row
        return True

    def _run_batch(
        self, items: list[ScheduledSeq], want_all: list[bool], indices: list[int], results: list[ChunkLogits]
    ) -> None:
        bs = self.block_size
        width = max(it.num_tokens for it in items)
        batch = len(items)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        slot_parts: list[Tensor] = []
        row_parts: list[Tensor] = []
        logit_rows: list[Tensor] = []
        contexts = []
        table_width = max(len(it.seq.block_table) for it in items)
        tables = torch.zeros(batch, table_width, dtype=torch.long)
        for b, it in enumerate(items):
            seq, start, n = it.seq, it.seq.num_computed, it.num_tokens
            input_ids[b, :n] = torch.tensor(seq.token_ids[start : start + n])
            pos = torch.arange(start, start + n)
            positions[b, :n] = pos
            # padding queries reuse the last position (finite, discarded); Mamba layers need -1 (state untouched)
            positions[b, n:] = start + n - 1 if self.state_cache is None else -1
            table = torch.tensor(seq.block_table)
            tables[b, : len(table)] = table
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            row_parts.append(torch.arange(b * width, b * width + n))
            contexts.append(start + n)
            if want_all[b]:
                logit_rows.append(torch.arange(b * width, b * width + n))
            elif it.completes:
                logit_rows.append(torch.tensor([b * width + n - 1]))
        if self.sinks is not None:
            view_slots, key_positions = self._sink_view(items, positions)
        else:
            span = -(-max(contexts) // bs)
            view_slots = (tables[:, :span, None] * bs + torch.arange(bs)).reshape(batch, span * bs)
            key_positions = torch.arange(span * bs).expand(batch, -1)
            key_positions = torch.where(key_positions < torch.tensor(contexts)[:, None], key_positions, -1)
        padded = any(it.num_tokens != width for it in items)
        dev = self.device
        self.cache.bind(
            torch.cat(slot_parts).to(dev),
            torch.cat(row_parts).to(dev) if padded else None,
            view_slots.to(dev),
            key_positions.to(dev),
        )
        rows = (torch.cat(logit_rows) if logit_rows else torch.zeros(0, dtype=torch.long)).to(dev)
        self._route([it.seq for it in items])
        cache = self.cache
        if self.state_cache is not None:
            pool = self.state_cache.pool
            slots = [pool.slot(it.seq.seq_id, fresh=it.seq.num_computed == 0) for it in items]
            self.state_cache.bind(slots, dev)
            cache = self.state_cache
        prefix_lengths = None
        if self.prefix_lm:  # the prompt is the bidirectional prefix
            prefix_lengths = torch.tensor([it.seq.prompt_len for it in items], device=dev)
        if self.cross is not None:  # an encoder-decoder: the decoder, with each row's source
            seqs = [it.seq for it in items]
            self.cross.ensure(seqs, dev)
            cross_kv, source_mask = self.cross.gather(seqs)
            logits = self.model.decode_rows(
                input_ids.to(dev),
                positions.to(dev),
                key_positions.to(dev),
                PagedSelfAttention(self.cache),
                cross_kv,
                source_mask,
                rows,
            )
        else:
            logits = self.model(
                input_ids.to(dev),
                position_ids=positions.to(dev),
                cache=cache,
                logits_rows=rows,
                prefix_lengths=prefix_lengths,
            ).logits
        offset = 0
        for b, it in enumerate(items):
            result = results[indices[b]]
            if want_all[b]:
                result.all = logits[offset : offset + it.num_tokens]
                if it.completes:
                    result.block, result.row = logits, offset + it.num_tokens - 1
                offset += it.num_tokens
            elif it.completes:
                result.block, result.row = logits, offset
                offset += 1

    def _sink_view(self, items: list[ScheduledSeq], positions: Tensor) -> tuple[Tensor, Tensor]:
        """Attention sinks: each row reads its kept tokens (the first ``sink``, the last ``window`` computed)
        and this chunk's, at positions 0 .. n-1 in that order; ``positions`` (the queries') are rewritten to
        match. Returns the view's slots and key positions (-1: padding)."""
        assert self.sinks is not None
        sink, window = self.sinks
        bs = self.block_size
        rows: list[list[int]] = []
        for b, it in enumerate(items):
            computed, n = it.seq.num_computed, it.num_tokens
            if computed <= sink + window:
                kept = list(range(computed))
            else:
                kept = list(range(sink)) + list(range(computed - window, computed))
            table = it.seq.block_table
            rows.append([table[i // bs] * bs + i % bs for i in kept + list(range(computed, computed + n))])
            positions[b, :n] = torch.arange(len(kept), len(kept) + n)
            positions[b, n:] = len(kept) + n - 1
        width = max(map(len, rows))
        view_slots = torch.zeros(len(rows), width, dtype=torch.long)
        key_positions = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, slots in enumerate(rows):
            view_slots[b, : len(slots)] = torch.tensor(slots)
            key_positions[b, : len(slots)] = torch.arange(len(slots))
        return view_slots, key_positions

    def _route(self, seqs: list[Sequence]) -> None:
        """Tell the served adapters which batch row runs which adapter."""
        if self.loras is not None:
            self.loras.route([s.lora_slot for s in seqs])


def _bucket(
    indices: list[int], size: Callable[[int], int], min_padding: int, slack: float = 1.25
) -> list[list[int]]:
    """Group indices, largest first, into batches whose padded size (rows x largest) stays within ``slack``
    times their real size, or within ``min_padding`` padded units (small waste is not worth a forward)."""
    groups: list[list[int]] = []
    for i in sorted(indices, key=lambda i: -size(i)):
        if groups:
            group = groups[-1]
            real = sum(size(j) for j in group) + size(i)
            padded = size(group[0]) * (len(group) + 1)
            if padded <= slack * real or padded - real <= min_padding:
                group.append(i)
                continue
        groups.append([i])
    return groups
