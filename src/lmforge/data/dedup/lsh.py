"""Banded locality-sensitive hashing over MinHash signatures, and the clusters it finds.

Signatures are cut into ``bands`` bands of ``rows`` values; documents that agree on a whole band are
candidates. (bands, rows) come from a Jaccard threshold by minimising the weighted false-positive and
false-negative areas under the S-curve, as datasketch's ``_optimal_param`` does. Candidates are joined
into clusters whose root is always the smallest index, so "keep the first document of each cluster" is
deterministic.

The candidate search splits by bucket: part ``k`` of ``n`` handles the buckets whose hashed key is ``k``
modulo ``n`` and emits their edges (:func:`candidate_edges`), so ``n`` workers each hold about ``1/n``
of the bucket keys; the clusters are the connected components of all parts' edges
(:func:`component_roots`), the same whatever ``n``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    keys = np.empty((bands, len(signatures)), dtype=np.uint64)
    for band in range(bands):
        block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)  # one band at a time
        if rows == 1:
            keys[band] = block[:, 0]
        elif rows == 2:
            keys[band] = (block[:, 0] << np.uint64(32)) | block[:, 1]
        else:
            key = np.zeros(len(signatures), dtype=np.uint64)
            for col in range(rows):
                key = fmix64(key ^ block[:, col]) + np.uint64(col)
            keys[band] = key
    return keys


def bucket_part(keys: np.ndarray, band: int, n_parts: int) -> np.ndarray:
    """Which of ``n_parts`` reduce parts handles each bucket of ``band`` (its keys hashed with the band)."""
    return (fmix64(keys ^ np.uint64(band)) % np.uint64(n_parts)).astype(np.int64)


def candidate_edges(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    bands: int,
    rows: int,
    part: int = 0,
    n_parts: int = 1,
    all_pairs: bool = False,
) -> np.ndarray:
    """Distinct (i, j), i < j, pairs of documents sharing a bucket whose part is ``part``, shape (M, 2).

    ``blocks`` are ``(indices, signatures)``: each document's index and signature, a block at a time (an
    artifact), so only the bucket keys of this part are held: about ``1 / n_parts`` of them. The ``n_parts``
    parts together find exactly the pairs of one part over all buckets. By default each bucket yields the
    pairs (smallest member, other member): enough for connected components with far fewer pairs.
    ``all_pairs`` yields every pair in a bucket (needed when each pair is verified on its own).
    """
    keys: list[list[np.ndarray]] = [[] for _ in range(bands)]  # this part's keys, band by band
    indices: list[list[np.ndarray]] = [[] for _ in range(bands)]
    for index, signatures in blocks:
        if bands * rows > signatures.shape[1]:
            raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
        index = np.asarray(index, dtype=np.int64)
        for band, band_keys in enumerate(_band_keys(signatures, bands, rows)):
            mine = bucket_part(band_keys, band, n_parts) == part if n_parts > 1 else slice(None)
            keys[band].append(band_keys[mine])
            indices[band].append(index[mine])
    found = [np.empty((0, 2), dtype=np.int64)]
    for band in range(bands):  # buckets never span bands: sort one band at a time
        key = np.concatenate(keys[band] or [np.empty(0, np.uint64)])
        index = np.concatenate(indices[band] or [np.empty(0, np.int64)])
        keys[band] = indices[band] = []
        order = np.lexsort((index, key))
        key, index = key[order], index[order]
        run_start = np.concatenate(([True], key[1:] != key[:-1]))[: len(key)]
        if not all_pairs:
            first = index[run_start][np.cumsum(run_start) - 1]
            members = ~run_start
            found.append(np.stack([first[members], index[members]], axis=1))
            continue
        starts = np.flatnonzero(run_start)
        ends = np.append(starts[1:], len(index))
        for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            group = index[lo:hi]
            i, j = np.triu_indices(len(group), k=1)
            found.append(np.stack([group[i], group[j]], axis=1))
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int, all_pairs: bool = False) -> np.ndarray:
    """Distinct (i, j), i < j, index pairs that share a bucket in at least one band, shape (M, 2)
    (see :func:`candidate_edges`)."""
    return candidate_edges([(np.arange(len(signatures)), signatures)], bands, rows, all_pairs=all_pairs)


def verified_edges(pairs: np.ndarray, shingle_sets: Mapping[int, np.ndarray], threshold: float) -> np.ndarray:
    """The candidate pairs whose exact Jaccard similarity (of unique, sorted shingle sets) reaches
    ``threshold``."""
    keep = [
        jaccard(shingle_sets[i], shingle_sets[j], assume_unique=True) >= threshold for i, j in pairs.tolist()
    ]
    return pairs[np.asarray(keep, dtype=bool)] if len(pairs) else pairs


def component_roots(n: int, edges: np.ndarray) -> np.ndarray:
    """For each of ``n`` nodes the smallest node of its connected component under ``edges`` ((M, 2)).

    Vectorised union-find: every edge hooks the larger of its two roots under the smaller, then pointer
    jumping flattens the trees, until every edge joins equal roots (a few rounds for LSH's graphs).
    """
    root = np.arange(n, dtype=np.int64)
    u, v = edges[:, 0], edges[:, 1]
    while True:
        ru, rv = root[u], root[v]
        split = ru != rv
        if not split.any():
            return root
        low = np.minimum(ru[split], rv[split])
        np.minimum.at(root, ru[split], low)
        np.minimum.at(root, rv[split], low)
        while not np.array_equal(jumped := root[root], root):
            root = jumped


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
    pairs = lsh_candidate_pairs(signatures, bands, rows, all_pairs=shingle_sets is not None)
    if shingle_sets is not None:
        involved = np.unique(pairs)
        pairs = verified_edges(pairs, {i: np.unique(shingle_sets[i]) for i in involved.tolist()}, threshold)
    return component_roots(len(signatures), pairs)
