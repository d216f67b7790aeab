import pytest

from lmforge.infer import block_manager as bm_module
from lmforge.infer.block_manager import NULL_BLOCK, BlockManager
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.sequence import Sequence


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does for a prefill: reserve slots, 'compute' them, register full blocks."""
    assert bm.ensure_slots(seq, seq.num_uncomputed)
    seq.num_computed = seq.num_tokens
    bm.register_computed(seq)


def test_allocation_and_free_keep_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    seq = _seq(list(range(10)))
    assert bm.ensure_slots(seq, 10)
    assert len(seq.block_table) == 3 and NULL_BLOCK not in seq.block_table
    assert bm.num_free_blocks == 9 - 3
    bm.free(seq)
    assert bm.num_free_blocks == 9 and all(c == 0 for c in bm.ref_counts)


def test_ensure_slots_refuses_without_side_effects_when_the_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = _seq(list(range(12)))
    assert not bm.ensure_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_is_found_once_computed_and_counts_hits():
    bm = BlockManager(num_blocks=20, block_size=4)
    first = _seq(list(range(11)))  # two full blocks + 3 tokens
    assert bm.match_prefix(first) == 0
    _compute(bm, first)
    second = _seq([*list(range(8)), 50, 51, 52])
    assert bm.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 2
    assert bm.stats.hits == 2
    third = _seq([0, 1, 2, 99, *list(range(4, 11))])  # differs in the first block: chained hash misses all
    assert bm.match_prefix(third) == 0


def test_last_token_is_always_left_to_compute():
    bm = BlockManager(num_blocks=20, block_size=4)
    first = _seq(list(range(8)))
    _compute(bm, first)
    again = _seq(list(range(8)))
    assert bm.match_prefix(again) == 4  # the second block holds the last token, whose logits are needed


def test_hit_is_verified_against_the_stored_tokens(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=20, block_size=4)
    _compute(bm, _seq([1, 2, 3, 4, 5]))
    other = _seq([9, 9, 9, 9, 5])
    assert bm.match_prefix(other) == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    a = _seq([1, 2, 3, 4, 5])
    _compute(bm, a)  # 3 blocks, two full and cached
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2
    hit = _seq([1, 2, 3, 4, 7])
    assert bm.match_prefix(hit) == 4
    bm.free(hit)
    big = _seq(list(range(100, 108)))
    _compute(bm, big)  # needs all 4 blocks: both cached ones are evicted
    assert set(bm.cached.values()) == set(big.block_table) and bm.num_free_blocks == 0
    bm.free(big)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 7])) == 0


def test_eviction_takes_never_cached_blocks_first_then_the_prefix_tail():
    bm = BlockManager(num_blocks=6, block_size=2)  # 5 usable
    a = _seq([1, 2, 3, 4, 5])
    _compute(bm, a)
    bm.free(a)  # two cached full blocks become evictable, the partial one plainly free
    _compute(bm, _seq([7, 7, 8]))  # 2 blocks: taken from the 3 never-cached free blocks
    first_probe = _seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(first_probe) == 4
    bm.free(first_probe)
    _compute(bm, _seq([20, 21, 22]))  # 2 blocks: the last plain one, then one eviction
    probe = _seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(probe) == 2  # a's tail block went first; its head is still cached


def test_fork_shares_blocks_and_copies_a_shared_partial_tail_on_write():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = _seq([1, 2, 3, 4, 5, 6])
    _compute(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert bm.ref_counts[parent.block_table[1]] == 2
    parent.append_token(7, None)
    child.append_token(8, None)
    tail = parent.block_table[1]
    assert bm.ensure_slots(parent, 1)
    assert parent.block_table[1] != tail and bm.take_copies() == [(tail, parent.block_table[1])]
    assert bm.ensure_slots(child, 1)
    assert child.block_table[1] == tail and bm.take_copies() == []  # now the only owner: written in place
    assert parent.block_table[0] == child.block_table[0]


@pytest.mark.parametrize("caching", [True, False])
def test_everything_returns_to_the_pool(caching):
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=caching)
    seqs = [_seq(list(range(n))) for n in (3, 9, 14)]
    for s in seqs:
        bm.match_prefix(s)
        _compute(bm, s)
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 15 and bm.num_used_blocks == 0
