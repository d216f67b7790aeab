"""Suffix arrays by prefix doubling in numpy, and the repeated spans they reveal (Lee et al. 2022).

Exact-substring dedup works on **UTF-8 bytes**, as the released ExactSubstr tool of Lee et al. does (the
data layer sits below the tokenizer, so it cannot count tokens): the paper's threshold of 50 tokens is
about 100+ bytes of English, hence the default ``min_bytes=100`` of the pipeline step.

Construction
------------
:func:`suffix_array` is Manber–Myers prefix doubling: start from the rank of each symbol; at step ``h``
the rank of suffix ``i`` orders the pairs ``(rank_h[i], rank_h[i + h])``, giving ranks by the first ``2h``
symbols. Each step is one ``argsort`` of ``int64`` keys (O(n log n)), and the loop stops as soon as all
ranks are distinct, i.e. after ``ceil(log2(longest repeat + 1))`` steps, so O(n log n · log L) for a
longest repeated substring of length L. Nothing ever compares suffix strings.

Repeats of at least ``k`` symbols
---------------------------------
Suffixes whose first ``k`` symbols agree are contiguous in the suffix array, and for that the array only
has to be sorted to depth ``k``. With the ranks of prefix length ``h`` (the largest power of two
``<= k``), two suffixes ``a, b`` share ``k`` symbols iff ``rank_h[a] == rank_h[b]`` and
``rank_h[a + k - h] == rank_h[b + k - h]`` (two overlapping windows of length ``h`` cover ``k``): so
:func:`kgram_groups` stops the doubling at depth ``h`` and sorts once more by that pair, giving the suffix
array to depth ``k`` in which "LCP >= k" of adjacent entries is one vectorised comparison (no LCP array,
no Kasai). Cost: O(n log n · log k), independent of how long the longest repeat is.

Documents are concatenated with a **unique separator** after each (symbols ``256 + j``), so no window
that crosses a document boundary can match another window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SEPARATOR_BASE = 256


def concatenate_documents(docs: Sequence[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, starts)``: the documents' bytes as ``int64`` symbols, each followed by its own separator
    (``256 + j`` for document ``j``), and the index in ``values`` where each document starts."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    starts = np.zeros(len(docs), dtype=np.int64)
    if len(docs) > 1:
        starts[1:] = np.cumsum(lengths + 1)[:-1]
    values = np.empty(int(lengths.sum()) + len(docs), dtype=np.int64)
    for j, (doc, start) in enumerate(zip(docs, starts.tolist())):
        data = np.frombuffer(doc, dtype=np.uint8) if isinstance(doc, bytes | bytearray) else doc
        values[start : start + len(data)] = data
        values[start + len(data)] = _SEPARATOR_BASE + j
    return values, starts


def _dense_ranks(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense ranks of ``keys`` (equal keys, equal rank), the sorting order, and the number of classes."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new_class = np.empty(len(keys), dtype=bool)
    if len(keys):
        new_class[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_class[1:])
    ranks_sorted = np.cumsum(new_class, dtype=np.int64) - 1
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[order] = ranks_sorted
    return ranks, order, int(ranks_sorted[-1]) + 1 if len(keys) else 0


def suffix_array(
    values: np.ndarray, keep_level: int | None = None, max_level: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Suffix array of the integer sequence ``values`` by prefix doubling.

    Returns ``(sa, ranks)``: ``sa[r]`` is the start of the ``r``-th smallest suffix (a suffix that is a
    proper prefix of another sorts first), and, when ``keep_level`` (a power of two) is given, the ranks
    of the prefixes of length ``keep_level`` (``ranks[i] == ranks[j]`` iff ``values[i:i+keep_level] ==
    values[j:j+keep_level]``, a window running past the end counting as distinct), else ``None``.
    With ``max_level`` (a power of two) the doubling stops once prefixes of that length are sorted: ``sa``
    is then the suffix array to that depth (suffixes with equal first ``max_level`` symbols in position
    order), which is all that finding repeats of a given length needs.
    """
    if keep_level is not None and (keep_level < 1 or keep_level & (keep_level - 1)):
        raise ValueError(f"keep_level must be a power of two, got {keep_level}")
    values = np.asarray(values, dtype=np.int64)
    n = len(values)
    rank, order, classes = _dense_ranks(values)
    saved = rank if keep_level == 1 else None
    h = 1
    while classes < n and (max_level is None or h < max_level):
        # Rank of the pair (rank[i], rank[i + h]); a suffix shorter than h + 1 has second key -1.
        second = np.full(n, -1, dtype=np.int64)
        second[: n - h] = rank[h:]
        if n < 3_000_000_000:  # (n + 1)^2 fits int64: one combined key, one sort
            rank, order, classes = _dense_ranks(rank * (n + 1) + (second + 1))
        else:  # pragma: no cover - corpora this large are sharded first
            order = np.lexsort((second, rank))
            pairs = np.stack([rank[order], second[order]])
            new_class = np.concatenate(([True], (pairs[:, 1:] != pairs[:, :-1]).any(axis=0)))
            rank = np.empty(n, dtype=np.int64)
            rank[order] = np.cumsum(new_class) - 1
            classes = int(new_class.sum())
        h *= 2
        if h == keep_level:
            saved = rank
    if keep_level is not None and saved is None:
        saved = rank  # all ranks were distinct before reaching keep_level: they stay as they are
    if classes == n:
        sa = np.empty(n, dtype=np.int64)
        sa[rank] = np.arange(n, dtype=np.int64)
    else:
        sa = np.argsort(rank, kind="stable")
    return sa, saved


def kgram_groups(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions whose ``k``-symbol window occurs at least twice, grouped by that window.

    Returns ``(starts, group)`` in suffix-array order (sorted by the first ``k`` symbols): ``starts[i]``
    shares its window with every other start of the same ``group[i]``; windows running past the end of
    ``values`` never match. The suffix array is built to depth ``h`` (the largest power of two ``<= k``,
    about ``log2 k`` doubling steps whatever the longest repeat), and one more sort by the pair
    ``(rank_h[i], rank_h[i + k - h])`` orders the suffixes by their first ``k`` symbols.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n = len(values)
    if n < k + 1:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    h = 1 << (k.bit_length() - 1)  # largest power of two <= k
    _, ranks = suffix_array(values, keep_level=h, max_level=h)
    assert ranks is not None
    starts = np.arange(n - k + 1, dtype=np.int64)  # windows inside values
    window, order, _ = _dense_ranks(ranks[starts] * (n + 1) + ranks[starts + (k - h)])
    window = window[order]
    same = window[1:] == window[:-1]  # adjacent entries of the depth-k suffix array share k symbols
    member = np.zeros(len(order), dtype=bool)
    member[:-1] |= same
    member[1:] |= same
    return starts[order][member], window[member]


def repeated_starts(values: np.ndarray, k: int, keep: str = "first") -> np.ndarray:
    """Sorted start positions of ``k``-windows that repeat: with ``keep="first"`` every occurrence but the
    first (smallest position), with ``keep="none"`` every occurrence."""
    if keep not in ("first", "none"):
        raise ValueError(f"keep must be 'first' or 'none', got {keep!r}")
    starts, group = kgram_groups(values, k)
    if keep == "first" and len(starts):
        order = np.lexsort((starts, group))
        starts, group = starts[order], group[order]
        first = np.concatenate(([True], group[1:] != group[:-1]))
        starts = starts[~first]
    return np.sort(starts)


def cover(starts: np.ndarray, k: int, n: int) -> np.ndarray:
    """Boolean mask of length ``n``: the union of ``[s, s + k)`` over ``starts``."""
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, np.minimum(starts, n), 1)
    np.add.at(delta, np.minimum(starts + k, n), -1)
    return np.cumsum(delta[:n]) > 0


def widen_to_characters(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Widen a byte mask over UTF-8 ``data`` so that it covers whole characters (a character with any
    byte masked is masked whole), so cutting the masked bytes leaves valid UTF-8."""
    data = np.asarray(data, dtype=np.uint8)
    if not len(data):
        return mask.copy()
    lead = (data & 0xC0) != 0x80
    char = np.cumsum(lead) - 1
    hit = np.bincount(char, weights=mask.astype(np.float64), minlength=int(char[-1]) + 1) > 0
    return hit[char]


def mask_spans(mask: np.ndarray) -> np.ndarray:
    """``(m, 2)`` array of the ``[start, end)`` runs of True in ``mask``."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int64)
