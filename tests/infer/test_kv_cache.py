import torch

from lmforge.infer.kv_cache import PagedKVCache, bytes_per_block, num_blocks_for_budget


def test_scatter_then_gather_returns_each_rows_tokens_in_order():
    cache = PagedKVCache(n_layers=1, num_blocks=10, block_size=2, n_kv_heads=1, head_dim=3)
    keys = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)  # 2 rows, 3 new tokens
    # row 0 uses blocks [4, 1] (tokens 0..2), row 1 blocks [7, 2] but only 2 real tokens (one padding)
    slots = torch.tensor([8, 9, 2, 14, 15])
    token_rows = torch.tensor([0, 1, 2, 3, 4])
    view_slots = torch.tensor([[8, 9, 2, 3], [14, 15, 4, 5]])
    positions = torch.tensor([[0, 1, 2, -1], [0, 1, -1, -1]])
    cache.bind(slots, token_rows, view_slots, positions)
    view = cache.update(0, keys, keys + 100, positions[:, :3])
    assert torch.equal(view.keys[0, 0, :3], keys[0, 0])
    assert torch.equal(view.keys[1, 0, :2], keys[1, 0, :2])
    assert torch.equal(view.values[0, 0, :3], keys[0, 0] + 100)
    assert view.positions is positions


def test_copy_blocks_copies_every_layer():
    cache = PagedKVCache(n_layers=2, num_blocks=4, block_size=2, n_kv_heads=1, head_dim=2)
    cache.k.normal_()
    cache.v.normal_()
    cache.copy_blocks([(1, 3)])
    assert torch.equal(cache.k[:, 6:8], cache.k[:, 2:4]) and torch.equal(cache.v[:, 6:8], cache.v[:, 2:4])


def test_pool_size_from_a_memory_budget():
    per_block = bytes_per_block(n_layers=4, n_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert per_block == 2 * 4 * 16 * 2 * 64 * 2
    assert num_blocks_for_budget(per_block * 10 + 5, 4, 2, 64, 16, torch.bfloat16) == 10
