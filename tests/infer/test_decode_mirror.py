import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.decode_mirror import DecodeMirror
from lmforge.infer.kv_cache import PagedKVCache

from .helpers import random_prompts, reference_greedy


def _cache() -> PagedKVCache:
    cache = PagedKVCache(n_layers=2, num_blocks=64, block_size=4, n_kv_heads=2, head_dim=8)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    return cache


def _row_matches_pool(
    mirror: DecodeMirror, cache: PagedKVCache, seq_id: int, table: list[int], n: int
) -> bool:
    b = mirror.bin_of[seq_id]
    row = b.row_of[seq_id]
    slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(n)])
    return torch.equal(b.k[:, row, :, :n], cache.k[:, slots].transpose(1, 2)) and torch.equal(
        b.v[:, row, :, :n], cache.v[:, slots].transpose(1, 2)
    )


def test_rows_are_filled_from_the_pool_and_compacted_on_release():
    cache = _cache()
    mirror = DecodeMirror(cache, max_bytes=2**30, max_bins=1)
    tables = {1: [1, 2, 3], 2: [4, 5], 3: [6, 7, 8, 9]}
    computed = {1: 9, 2: 6, 3: 13}
    ((b, order),) = mirror.arrange(
        [1, 2, 3], [tables[i] for i in (1, 2, 3)], [computed[i] for i in (1, 2, 3)]
    )
    assert order == [2, 0, 1] and b.num_rows == 3  # newcomers take rows longest first
    assert all(_row_matches_pool(mirror, cache, i, tables[i], computed[i]) for i in (1, 2, 3))
    ((b, order),) = mirror.arrange([3, 2], [tables[3], tables[2]], [computed[3], computed[2]])
    assert b.num_rows == 2 and b.row_of == {3: 0, 2: 1} and order == [0, 1]  # seq 2 moved into seq 1's row
    assert _row_matches_pool(mirror, cache, 2, tables[2], computed[2])


def test_a_long_newcomer_gets_its_own_bin():
    cache = _cache()
    mirror = DecodeMirror(cache, max_bytes=2**30, max_bins=2, forward_cost=40)
    short = [[1, 2]] * 6
    batches = mirror.arrange(list(range(6)), short, [5, 6, 7, 5, 6, 7])
    assert len(batches) == 1
    batches = mirror.arrange(
        [*range(6), 99], [*short, [10, 11, 12, 13, 14, 15, 16, 17]], [6, 7, 8, 6, 7, 8, 30]
    )
    assert len(batches) == 2 and mirror.bin_of[99] is not mirror.bin_of[0]


def test_engine_greedy_is_unchanged_when_decodes_spread_over_bins(tiny_model):
    prompts = random_prompts([3, 60, 5, 41, 8, 90])
    engine = LLMEngine(tiny_model, None, EngineConfig(num_blocks=256, block_size=4))
    mirror = engine.runner.mirror
    mirror.forward_cost = 8  # split eagerly
    bins_used = []
    arrange = mirror.arrange
    mirror.arrange = lambda *args: bins_used.append(len(batches := arrange(*args))) or batches
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = engine.generate(prompts, params)
    assert max(bins_used) > 1
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(tiny_model, p, 8) for p in prompts]


def test_over_budget_the_mirror_steps_aside_and_catches_up_later():
    cache = _cache()
    mirror = DecodeMirror(cache, max_bytes=0)
    tables, computed = [[1, 2, 3], [4, 5]], [9, 6]
    assert mirror.arrange([1, 2], tables, computed) is None and mirror.nbytes == 0
    mirror.max_bytes = 2**30
    computed = [10, 7]  # the gather path decoded one token meanwhile
    assert mirror.arrange([1, 2], tables, computed) is not None
    assert _row_matches_pool(mirror, cache, 1, tables[0], 10) and _row_matches_pool(
        mirror, cache, 2, tables[1], 7
    )


def test_engine_within_a_small_mirror_budget(tiny_model):
    prompts = random_prompts([3, 60, 5, 41])
    engine = LLMEngine(tiny_model, None, EngineConfig(num_blocks=256, block_size=4))
    mirror = engine.runner.mirror
    mirror.max_bytes = 130_000  # 253 tokens of 512 bytes: four rows of 63, not of 64
    fell_back = []
    arrange = mirror.arrange
    mirror.arrange = lambda *args: (batches := arrange(*args)) or fell_back.append(True) or batches
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = engine.generate(prompts, params)
    assert fell_back and 0 < engine.stats().decode_mirror_bytes <= 130_000
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(tiny_model, p, 8) for p in prompts]


def test_near_the_budget_unused_rows_are_dropped_instead_of_reallocating_every_step():
    # 16 pre-sized rows x 128 tokens fit the budget, 16 x 256 do not: one decoding sequence growing past 128
    # must not make every step reallocate the buffer one token longer (it keeps its one row, length doubled)
    cache = PagedKVCache(n_layers=2, num_blocks=80, block_size=4, n_kv_heads=2, head_dim=8)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    row_bytes_per_token = 2 * 2 * 2 * 8 * 4
    mirror = DecodeMirror(cache, max_bytes=16 * 200 * row_bytes_per_token, max_rows=16, max_bins=1)
    table = list(range(1, 60))
    buffers = set()
    for computed in range(120, 200):
        ((b, _),) = mirror.arrange([7], [table], [computed])
        buffers.add(b.k.data_ptr())
        assert _row_matches_pool(mirror, cache, 7, table, 120)  # (later tokens come from update())
    assert b.k.shape[1] == 1 and b.k.shape[3] >= 200
    assert len(buffers) <= 2
