"""Block manager: a pool of fixed-size KV blocks with reference counts and a prefix cache.

A sequence's keys/values live in the blocks of its block table, token ``i`` in block ``table[i // B]`` at offset
``i % B``. Blocks are shared by reference count: forks (beams, ``n > 1``) share their history, and full blocks
whose contents are known are shared between requests through the prefix cache. A full block is identified by
the chained hash ``hash((parent_hash, tokens))``, so its identity covers the whole prefix before it; a hit is
verified by comparing the stored tokens. Blocks whose count drops to zero keep their cached contents and go to
an LRU list, evicted only when no never-cached free block is left. Block 0 is reserved as the padding block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmforge.infer.sequence import Sequence

NULL_BLOCK = 0


@dataclass
class PrefixCacheStats:
    queries: int = 0  # full prompt blocks looked up
    hits: int = 0  # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: need at least 2 (one is the padding block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_blocks: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() gives low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free blocks still in the cache, LRU first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) copy-on-write work for the next forward
        self.stats = PrefixCacheStats()
        # a virtual prefix's blocks (keys/values every sequence starts with), held by the manager for good
        self.pinned: list[int] = []
        self.pinned_tokens = 0

    # -- accounting ----------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ----------------------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]  # type: ignore[arg-type]
            self.block_hash[block] = None
            self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] > 0:
            return
        block_hash = self.block_hash[block]
        if block_hash is not None and self.cached.get(block_hash) == block:
            self.evictable[block] = None
        else:
            self.block_hash[block] = None
            self.block_tokens[block] = None
            self.free_blocks.append(block)

    def pin(self, num_tokens: int) -> list[int]:
        """Take the blocks of a virtual prefix of ``num_tokens`` positions (once, before any sequence)."""
        if self.pinned or self.num_used_blocks:
            raise ValueError("a virtual prefix is set once, before any request")
        needed = self.blocks_for(num_tokens)
        if needed > self.num_free_blocks - 1:
            raise ValueError(
                f"the virtual prefix needs {needed} KV blocks; the pool has {self.num_free_blocks}"
            )
        self.pinned = [self._take_block() for _ in range(needed)]
        self.pinned_tokens = num_tokens
        return self.pinned

    def attach_pinned(self, seq: Sequence) -> None:
        """Start a sequence with a virtual prefix on the pinned blocks (shared; a partly filled last block is
        copied when the sequence first writes into it)."""
        assert not seq.block_table and seq.num_computed == 0
        if not seq.num_virtual:
            return
        assert seq.num_virtual == self.pinned_tokens, "the sequence was made for another virtual prefix"
        for block in self.pinned:
            self.ref_counts[block] += 1
        seq.block_table = list(self.pinned)
        seq.num_computed = self.pinned_tokens
        bs = self.block_size
        parent = seq.hash_root
        for i in range(self.pinned_tokens // bs):
            parent = chain_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            seq.block_hashes.append(parent)

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the sequence's leading full blocks (after its virtual prefix, if any);
        returns the number of tokens reused, the virtual prefix included.

        At least one token is always left to compute, since the last one's logits are needed. Behind a
        virtual prefix that ends inside a block, nothing more is matched.
        """
        self.attach_pinned(seq)
        bs = self.block_size
        if not self.enable_prefix_caching or seq.num_computed % bs:
            return seq.num_computed
        full_blocks = (seq.num_tokens - 1) // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else seq.hash_root
        for i in range(len(seq.block_table), full_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = chain_hash(parent, tokens)
            self.stats.queries += 1
            block = self.cached.get(block_hash)
            if block is None or self.block_tokens[block] != tokens:
                self.stats.queries += full_blocks - i - 1
                break
            self.stats.hits += 1
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
            parent = block_hash
        seq.num_computed = len(seq.block_table) * bs
        return seq.num_computed

    def copies_on_write(self, seq: Sequence) -> int:
        """1 if the sequence's next write goes into a shared, partly filled block (which is copied first)."""
        return int(
            seq.num_computed % self.block_size != 0
            and bool(seq.block_table)
            and self.ref_counts[seq.block_table[-1]] > 1
        )

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for its next ``num_new_tokens`` tokens; False (nothing changed) if blocks run out.

        A shared, partly filled last block is copied before it is written (copy-on-write after a fork).
        """
        end = seq.num_computed + num_new_tokens
        needed = self.blocks_for(end) - len(seq.block_table)
        writes_shared_tail = self.copies_on_write(seq)
        if needed + writes_shared_tail > self.num_free_blocks:
            return False
        if writes_shared_tail:
            src = seq.block_table[-1]
            dst = self._take_block()
            self._release(src)
            seq.block_table[-1] = dst
            self.pending_copies.append((src, dst))
        for _ in range(needed):
            seq.block_table.append(self._take_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` (already a copy of ``parent``'s table) share every block of the parent."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)

    def evict(self, seq: Sequence, first: int, stop: int) -> int:
        """Release the sequence's blocks ``first .. stop-1`` (attention sinks: the middle of a long stream);
        their table entries become the null block, so block indices still follow stream positions. Returns
        how many were released."""
        released = 0
        for i in range(first, min(stop, len(seq.block_table))):
            if seq.block_table[i] != NULL_BLOCK:
                self._release(seq.block_table[i])
                seq.block_table[i] = NULL_BLOCK
                released += 1
        return released

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail first, so the LRU list evicts a prefix's tail before its head."""
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._release(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    # -- prefix cache ------------------------------------------------------------------------------------
    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.hash_root
            block_hash = chain_hash(parent, tokens)
            seq.block_hashes.append(block_hash)
            block = seq.block_table[i]
            if block_hash not in self.cached and self.block_hash[block] is None:
                self.cached[block_hash] = block
                self.block_hash[block] = block_hash
                self.block_tokens[block] = tokens

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
