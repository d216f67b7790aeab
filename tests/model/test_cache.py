import pytest
import torch

from lmforge.model.cache import ContiguousKVCache


def test_padding_positions_do_not_clobber_slot_zero():
    cache = ContiguousKVCache(n_layers=1, batch=2, n_kv_heads=1, head_dim=2, max_len=4)
    keys = torch.arange(12, dtype=torch.float32).view(2, 1, 3, 2)
    view = cache.update(0, keys, -keys, torch.tensor([[0, 1, 2], [0, -1, -1]]))
    assert view.positions.tolist() == [[0, 1, 2], [0, -1, -1]]
    torch.testing.assert_close(view.keys[1, 0, 0], keys[1, 0, 0])  # not overwritten by the padded tokens
    torch.testing.assert_close(view.values[0], -keys[0])
    assert cache.lengths().tolist() == [3, 1]
    assert cache.length() == 3


def test_positions_beyond_the_cache_are_refused():
    cache = ContiguousKVCache(n_layers=1, batch=1, n_kv_heads=1, head_dim=2, max_len=2)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.tensor([[2]]))
