"""Banded locality-sensitive hashing over MinHash signatures, and the clusters it finds.

Signatures are cut into ``bands`` bands of ``rows`` values; documents that agree on a whole band are
candidates. (bands, rows) come from a Jaccard threshold by minimising the weighted false-positive and
false-negative areas under the S-curve, as datasketch's ``_optimal_param`` does. Candidates are joined
into clusters with a union-find whose root is always the smallest index, so "keep the first document of
each cluster" is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from lmforge.data.text import fmix64

# ----------------------------------------------------------------------------------------- LSH parameters


def _s_curve_areas(threshold: float, bands: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Areas under P(candidate | s) = 1 - (1 - s^r)^b on [0, t] (false positives) and above it on [t, 1].

    The integrand is a polynomial of degree b*r <= num_perm, so Gauss-Legendre quadrature with
    ceil((num_perm + 1) / 2) nodes is exact up to rounding.
    """
    degree = int((bands * rows).max())
    nodes, weights = np.polynomial.legendre.leggauss(degree // 2 + 2)

    def integral(lo: float, hi: float, negate: bool) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        p = 1.0 - (1.0 - s[None, :] ** rows[:, None]) ** bands[:, None]
        if negate:
            p = 1.0 - p
        return (hi - lo) / 2 * (p * weights[None, :]).sum(axis=1)

    return integral(0.0, threshold, False), integral(threshold, 1.0, True)


@lru_cache(maxsize=64)
def optimal_lsh_params(
    threshold: float,
    num_perm: int,
    false_positive_weight: float = 0.5,
    false_negative_weight: float = 0.5,
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight * FP area + fn_weight * FN area.

    Candidates are scanned in datasketch's order (bands ascending, then rows ascending) and the first
    minimum wins, so ties resolve the same way.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands = np.array([p[0] for p in pairs], dtype=np.float64)
    rows = np.array([p[1] for p in pairs], dtype=np.float64)
    fp, fn = _s_curve_areas(threshold, bands, rows)
    error = fp * false_positive_weight + fn * false_negative_weight
    return pairs[int(np.argmin(error))]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of agreeing signature positions: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def jaccard(a: np.ndarray, b: np.ndarray, assume_unique: bool = False) -> float:
    """Exact Jaccard similarity of two hash sets (two empty sets are identical: 1.0)."""
    if not assume_unique:
        a, b = np.unique(a), np.unique(b)
    union = len(a) + len(b)
    if union == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (union - inter)


# ------------------------------------------------------------------------------------------ LSH + clusters


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, N) uint64 bucket keys; a band of <= 2 rows is packed exactly, longer bands are hashed."""
    sig = signatures.astype(np.uint64)
    keys = np.empty((bands, len(sig)), dtype=np.uint64)
    for band in range(bands):
        block = sig[:, band * rows : (band + 1) * rows]
        if rows == 1:
            keys[band] = block[:, 0]
        elif rows == 2:
            keys[band] = (block[:, 0] << np.uint64(32)) | block[:, 1]
        else:
            key = np.zeros(len(sig), dtype=np.uint64)
            for col in range(rows):
                key = fmix64(key ^ block[:, col]) + np.uint64(col)
            keys[band] = key
    return keys


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int, all_pairs: bool = False) -> np.ndarray:
    """Distinct (i, j), i < j, index pairs that share a bucket in at least one band, shape (M, 2).

    By default each bucket yields the pairs (first member, other member): enough for connected
    components with far fewer pairs. ``all_pairs`` yields every pair in a bucket (needed when each pair
    is verified on its own).
    """
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
    n = len(signatures)
    found: list[np.ndarray] = []
    for keys in _band_keys(signatures, bands, rows):
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        run_start = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
        run_id = np.cumsum(run_start) - 1
        first = order[run_start][run_id]
        members = ~run_start
        if not all_pairs:
            found.append(np.stack([first[members], order[members]], axis=1))
            continue
        starts = np.flatnonzero(run_start)
        ends = np.append(starts[1:], n)
        for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            group = np.sort(order[lo:hi])
            i, j = np.triu_indices(len(group), k=1)
            found.append(np.stack([group[i], group[j]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


class UnionFind:
    """Disjoint sets over 0..n-1 whose representative is always the smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> int:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return rx
        low, high = (rx, ry) if rx < ry else (ry, rx)
        self.parent[high] = low
        return low

    def roots(self) -> np.ndarray:
        return np.array([self.find(x) for x in range(len(self.parent))], dtype=np.int64)


def cluster_near_duplicates(
    signatures: np.ndarray,
    threshold: float = 0.8,
    bands: int | None = None,
    rows: int | None = None,
    shingle_sets: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Cluster root (smallest member index) of every document; a document is kept iff it is its own root.

    With ``shingle_sets`` every candidate pair is checked with the exact Jaccard similarity and only
    pairs at or above ``threshold`` are joined. Checking needs every pair of a bucket, which grows with
    the square of its size: remove exact duplicates first (``exact_dedup``) when checking.
    """
    if bands is None or rows is None:
        bands, rows = optimal_lsh_params(threshold, signatures.shape[1])
    verify = shingle_sets is not None
    pairs = lsh_candidate_pairs(signatures, bands, rows, all_pairs=verify)
    uf = UnionFind(len(signatures))
    unique_sets = [np.unique(s) for s in shingle_sets] if verify else None
    for i, j in pairs.tolist():
        if (
            unique_sets is not None
            and jaccard(unique_sets[i], unique_sets[j], assume_unique=True) < threshold
        ):
            continue
        uf.union(i, j)
    return uf.roots()
