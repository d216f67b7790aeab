import pytest
from datasketch.lsh import _optimal_param

from lmforge.data.dedup.lsh import UnionFind, optimal_lsh_params


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("num_perm", [64, 112, 128, 256])
def test_lsh_params_match_datasketch(threshold, num_perm):
    assert optimal_lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_lsh_params_weighted_match_datasketch():
    assert optimal_lsh_params(0.8, 128, 0.9, 0.1) == _optimal_param(0.8, 128, 0.9, 0.1)
    assert optimal_lsh_params(0.6, 128, 0.2, 0.8) == _optimal_param(0.6, 128, 0.2, 0.8)


def test_union_find_roots_are_smallest_members():
    uf = UnionFind(6)
    uf.union(4, 2)
    uf.union(5, 4)
    uf.union(3, 1)
    assert uf.roots().tolist() == [0, 1, 2, 1, 2, 2]
    uf.union(5, 3)
    assert uf.roots().tolist() == [0, 1, 1, 1, 1, 1]
