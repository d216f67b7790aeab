import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from lmforge.data.dedup.lsh import UnionFind, candidate_edges, component_roots, optimal_lsh_params


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


def reference_roots(signatures: np.ndarray, bands: int, rows: int) -> list[int]:
    """The single-process clustering: every band's buckets in a dict, a Python union-find over them."""
    uf = UnionFind(len(signatures))
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(signatures):
            buckets.setdefault(sig[band * rows : (band + 1) * rows].tobytes(), []).append(i)
        for members in buckets.values():
            for other in members[1:]:
                uf.union(members[0], other)
    return uf.roots().tolist()


def planted_signatures(n_clusters: int, seed: int, num_perm: int = 128) -> np.ndarray:
    """Random signatures, most with copies that agree on a random 60-95% of their positions."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_clusters):
        base = rng.integers(0, 2**32, num_perm, dtype=np.uint32)
        rows.append(base)
        for _ in range(int(rng.integers(0, 4))):
            copy = base.copy()
            changed = rng.random(num_perm) > rng.uniform(0.6, 0.95)
            copy[changed] = rng.integers(0, 2**32, int(changed.sum()), dtype=np.uint32)
            rows.append(copy)
    return np.stack(rows)[rng.permutation(len(rows))]


@pytest.mark.parametrize("bands, rows", [(9, 13), (14, 9), (64, 2)])
def test_sharded_buckets_give_the_single_process_clusters(bands, rows):
    signatures = planted_signatures(400, seed=bands)
    expected = reference_roots(signatures, bands, rows)
    assert len(set(expected)) < len(signatures) - 100  # plenty of clusters to get right
    for n_parts in (1, 2, 3, 8):
        # Two "artifacts" of uneven size, read block by block, as the reduce parts read them.
        blocks = [(np.arange(0, 300), signatures[:300]), (np.arange(300, len(signatures)), signatures[300:])]
        edges = [candidate_edges(blocks, bands, rows, part, n_parts) for part in range(n_parts)]
        sizes = [len(e) for e in edges]
        assert n_parts == 1 or max(sizes) < sum(sizes)  # the work is really split
        assert component_roots(len(signatures), np.concatenate(edges)).tolist() == expected


def test_component_roots_on_long_chains():
    n = 1000
    edges = np.stack([np.arange(1, n), np.arange(n - 1)], axis=1)[::-1]  # n-1 -> n-2 -> ... -> 0
    assert component_roots(n, edges).tolist() == [0] * n
    assert component_roots(4, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2, 3]
