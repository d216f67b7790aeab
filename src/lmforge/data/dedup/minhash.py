"""Near-duplicate detection with MinHash signatures and banded LSH (Broder 1997; Leskovec et al., MMDS ch. 3).

Pipeline: a document becomes a set of word n-gram hashes (``uint32``); its signature is, for each of
``num_perm`` hash functions, the minimum over the set. The default scheme, ``"affine32"`` (datasketch's
default since 2.0), pre-mixes each hash with a bijection and applies ``h_k(x) = (a_k x + b_k) mod 2^32``
with odd ``a_k``; ``"mersenne"`` is the classic universal hash ``((a_k x + b_k) mod (2^61 - 1)) & (2^32 - 1)``
(datasketch's ``scheme="legacy"``, lmforge's default before 2026-12-04; the two give the same F1 in
``benchmarks/neardup_quality.py``, affine32 1.6-1.8x faster end to end). The permutation parameters are drawn
exactly as datasketch's MinHash of that scheme draws them and the arithmetic wraps as datasketch's does,
so for the same input hashes and seed the signatures are bit-identical to datasketch's. All permutations
are applied in one array operation per fixed-size chunk of shingles; nothing loops over permutations in
Python. The Mersenne reduction is never a division: the low 32 bits of ``v mod (2^61 - 1)`` are those of
``v + (v >> 61)`` (bar a provably rare case, detected per permutation), and most of it runs in 32-bit
arithmetic (see ``MinHasher._mersenne_segment_minima``).

Banded LSH over the signatures, and the clustering of its candidates, live in ``lmforge.data.dedup.lsh``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import (
    ClusterDecision,
    dataset_ranks,
    load_cluster_decision,
    write_cluster_decision,
)
from lmforge.data.dedup.lsh import candidate_edges, component_roots, optimal_lsh_params, verified_edges
from lmforge.data.document import Document
from lmforge.data.step import GlobalFilter, register_step
from lmforge.data.text import fmix64, word_hashes

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial combine stays order-sensitive
_MAX_HIGH = 7  # largest v >> 61 of a uint64 v


# ------------------------------------------------------------------------------------------- signatures

SCHEMES = ("mersenne", "affine32")


def datasketch_permutations(
    num_perm: int, seed: int = 1, scheme: str = "affine32"
) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) drawn in the same order from the same generator as datasketch's MinHash of that scheme
    ("mersenne" is datasketch's ``scheme="legacy"``, "affine32" its default since 2.0)."""
    gen = np.random.RandomState(seed)
    if scheme == "mersenne":
        params = np.empty((num_perm, 2), dtype=np.uint64)
        for k in range(num_perm):
            params[k, 0] = gen.randint(1, MERSENNE_PRIME, dtype=np.uint64)
            params[k, 1] = gen.randint(0, MERSENNE_PRIME, dtype=np.uint64)
        return params[:, 0].copy(), params[:, 1].copy()
    if scheme == "affine32":
        # Odd multipliers, so each map is a bijection.
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        return a, b
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the pre-mix datasketch applies in its affine schemes."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _first_multiple_in_range(a: int, m: int, lo: int, hi: int) -> int | None:
    """Smallest x >= 0 with lo <= (a x) mod m <= hi (0 <= lo <= hi < m), or None if there is none.

    Euclid-style recursion on (a, m) -> (m mod a, a): O(log m) steps.
    """
    a %= m
    if lo == 0:
        return 0
    if a == 0:
        return None
    x = -(-lo // a)
    if a * x <= hi:
        return x
    # Every solution wraps: a x - m y lies in [lo, hi] for some y >= 1. For a given y an x exists iff
    # (m y) mod a lies in the cyclic interval [-hi, -lo] (mod a); it does not contain 0 (y = 0 just
    # failed), so it is an ordinary interval. x grows with y, so the smallest y gives the smallest x.
    y = _first_multiple_in_range(m % a, a, (-hi) % a, (-lo) % a)
    return None if y is None else -(-(lo + m * y) // a)


def first_affine_hit(a: int, b: int, m: int, lo: int, hi: int) -> int | None:
    """Smallest x >= 0 with lo <= (a x + b) mod m <= hi (0 <= lo <= hi < m), or None if there is none."""
    lo, hi = (lo - b) % m, (hi - b) % m
    if lo <= hi:
        return _first_multiple_in_range(a, m, lo, hi)
    hits = [
        x
        for x in (_first_multiple_in_range(a, m, lo, m - 1), _first_multiple_in_range(a, m, 0, hi))
        if x is not None
    ]
    return min(hits, default=None)


def mersenne_folding_fails(a: int, b: int) -> bool:
    """Whether some 32-bit x makes the fast Mersenne reduction of ``a x + b`` (mod 2^64) inexact.

    With ``v = (a x + b) mod 2^64`` and ``p = 2^61 - 1``, ``v mod p = (v & p) + (v >> 61)`` minus ``p`` when
    that sum reaches ``p``; and since ``p = -1 (mod 2^32)``, the low 32 bits of the unreduced sum are just
    those of ``v + (v >> 61)``. The final subtraction can only be needed when ``v & p >= p - 7``, i.e. the low
    61 bits of ``a x + b`` fall in ``[2^61 - 8, 2^61 - 1]``: about one permutation in 2^26 has such an x.
    """
    hit = first_affine_hit(a, b, 1 << 61, (1 << 61) - 8, (1 << 61) - 1)
    return hit is not None and hit < 1 << 32


@lru_cache(maxsize=16)
def _mersenne_exact_rows(a_bytes: bytes, b_bytes: bytes) -> np.ndarray:
    """Rows (permutations) whose values must be computed exactly; cached, as hashers are built per task."""
    pairs = zip(
        np.frombuffer(a_bytes, dtype=np.uint64).tolist(), np.frombuffer(b_bytes, dtype=np.uint64).tolist()
    )
    return np.array([k for k, (a, b) in enumerate(pairs) if mersenne_folding_fails(a, b)], dtype=np.int64)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch's kernels on the calling thread only: the pipeline parallelizes over worker processes,
    and a block of ~2^19 values is too small to gain from more threads (it would only add overhead)."""
    import torch

    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


class _Segments:
    """Documents' shingle ranges cut at chunk boundaries: every segment lies inside one chunk."""

    def __init__(self, doc_starts: np.ndarray, total: int, chunk: int):
        n_chunks = -(-total // chunk)
        self.padded_length = n_chunks * chunk
        self.starts = np.union1d(doc_starts, np.arange(0, total, chunk))
        self.lengths = np.diff(self.starts, append=self.padded_length)
        self._chunk_first = np.searchsorted(self.starts, np.arange(0, self.padded_length + 1, chunk))

    def chunks(self, chunk: int) -> Iterator[tuple[int, int, int]]:
        """(first position, first segment, end segment) of every chunk."""
        for c in range(len(self._chunk_first) - 1):
            yield c * chunk, int(self._chunk_first[c]), int(self._chunk_first[c + 1])

    def index_of_position(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.starts)), self.lengths)


class MinHasher:
    """Word n-gram MinHash signatures, computed for many documents at once.

    ``signatures(texts)`` returns a ``(len(texts), num_perm)`` ``uint32`` array. Words are those of
    :func:`lmforge.data.text.word_hashes`; a document shorter than ``ngram`` words is one shingle of all
    its words, and one without words has the all-``2^32 - 1`` signature of the empty set (as datasketch).

    ``scheme="affine32"`` (the default, datasketch's default since 2.0) pre-mixes each shingle hash with
    a bijection and applies ``a x + b mod 2^32`` with odd ``a``; ``scheme="mersenne"`` is the classic
    universal hash ``((a x + b) mod (2^61 - 1)) & (2^32 - 1)`` (datasketch's ``legacy``).

    Shingles are processed in fixed chunks of ``_chunk`` (documents may straddle chunks: the minima of
    their pieces, "segments", are combined afterwards). A chunk is a ``(num_perm, _chunk)`` ``uint32``
    block, filled in one pass by torch (see ``_affine_chunk``) and reduced by numpy. An instance reuses
    these buffers: use one instance per thread.
    """

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        scheme: str = "affine32",
    ):
        if num_perm < 1 or ngram < 1:
            raise ValueError("num_perm and ngram must be positive")
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        self.scheme = scheme
        # Shingles per chunk: the (num_perm x chunk) uint32 block is at most 2 MiB (4096 shingles at 128
        # permutations). Measured on 3000 documents against 512 KiB (which fits a core's L2 cache): the
        # same time for affine32 on real text and 10-20% less on generated text, 10-25% less for mersenne,
        # whose per-chunk candidate bookkeeping is spread over more values. A power of two, so that
        # candidate indices are packed and unpacked with shifts.
        self._chunk = 1 << max(4, 19 - (num_perm - 1).bit_length())
        self._set_permutations(*datasketch_permutations(num_perm, seed, scheme))

    def _set_permutations(self, a: np.ndarray, b: np.ndarray) -> None:
        if self._chunk & (self._chunk - 1):
            raise ValueError(f"the chunk size must be a power of two, got {self._chunk}")
        self.a, self.b = a, b
        if self.scheme == "mersenne":
            # Low 32 bits of a x + b (mod 2^64) for 32-bit x, plus the 7 of the candidate bound (see
            # _mersenne_segment_minima).
            a, b = a & MAX_HASH, (b + np.uint64(_MAX_HIGH)) & MAX_HASH
            self._exact_rows = _mersenne_exact_rows(self.a.tobytes(), self.b.tobytes())
        shape = (self.num_perm, self._chunk)
        # The 32-bit block is computed by torch on int32 views of the same memory: it fills the block with
        # ``a x + b`` in one pass from the broadcast operands, where numpy needs four (copy, multiply and
        # add of pre-expanded parameters: its loops are not vectorized with broadcast operands). Wrapping
        # int32 arithmetic has the bits of uint32 arithmetic.
        # torch is imported here, not with the module: every recipe imports all step modules, and the
        # other steps need no torch.
        import torch

        self._values = np.empty(shape, dtype=np.uint32)
        self._values_t = torch.from_numpy(self._values.view(np.int32))
        self._a_t = torch.from_numpy(a.astype(np.uint32).view(np.int32))[:, None]
        self._b_t = torch.from_numpy(b.astype(np.uint32).view(np.int32))[:, None]
        # The candidate mask of the mersenne scheme (see _mersenne_segment_minima).
        self._candidates = np.empty(shape if self.scheme == "mersenne" else (0, 0), dtype=bool)

    # The work buffers share memory with torch views of them, which pickling would split: a pickled
    # hasher carries its configuration and permutations, and rebuilds the buffers.
    _BUFFERS = ("_values", "_values_t", "_a_t", "_b_t", "_candidates")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._BUFFERS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_permutations(self.a, self.b)

    # -- shingles
    def shingle_hash_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of many documents at once: (``uint32`` hashes, ``len(texts) + 1`` offsets).

        Document i owns ``hashes[offsets[i]:offsets[i + 1]]`` (repeats included; MinHash ignores them).
        Words of all documents are hashed in one pass and the n-gram windows are combined over the
        concatenation; windows that would cross a document boundary are dropped.
        """
        n = self.ngram
        flat_hashes, lengths = word_hashes(texts)
        total = len(flat_hashes)
        word_hashes_padded = np.concatenate([flat_hashes, np.zeros(n - 1, dtype=np.uint64)])
        combined = flat_hashes.copy()
        for offset in range(1, n):
            combined *= _NGRAM_MULTIPLIER
            combined += word_hashes_padded[offset : offset + total]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # Windows that stay inside their document: all but those starting in its last n - 1 words.
        inside = np.ones(total, dtype=bool)
        tails = ends[:, None] - np.arange(1, n)[None, :]
        inside[tails[tails >= starts[:, None]]] = False
        hashes = combined[inside]
        counts = np.maximum(lengths - n + 1, 0)
        short = np.flatnonzero((lengths > 0) & (lengths < n))
        if len(short):  # a document shorter than one n-gram is one shingle of all its words
            segments = np.split(hashes, np.cumsum(counts)[:-1])
            for i in short:
                value = np.zeros(1, dtype=np.uint64)
                for h in flat_hashes[starts[i] : starts[i] + lengths[i]]:
                    value = value * _NGRAM_MULTIPLIER + h
                segments[i] = value
            counts[short] = 1
            hashes = np.concatenate(segments)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        return (fmix64(hashes) >> np.uint64(32)).astype(np.uint32), offsets

    def shingle_hashes(self, text: str) -> np.ndarray:
        """``uint32`` hashes of one document's word n-grams."""
        return self.shingle_hash_batch([text])[0]

    # -- signatures
    def _affine_chunk(self, hashes: np.ndarray) -> np.ndarray:
        """``a x + b (mod 2^32)`` for every permutation (rows) and shingle hash x of the chunk (columns)."""
        import torch

        # b + a x as a rank-1 matrix product: one pass over the block (measured 3-13% less time for the
        # signatures than a broadcast multiply and an add). int32 arithmetic wraps mod 2^32, as datasketch's
        # uint32 arithmetic does (tested against it and on extreme values).
        x = torch.from_numpy(hashes.view(np.int32))[None, :]
        torch.addmm(self._b_t, self._a_t, x, out=self._values_t)
        return self._values

    def _affine32_segment_minima(self, padded: np.ndarray, segments: _Segments) -> np.ndarray:
        seg_min = np.empty((self.num_perm, len(segments.starts)), dtype=np.uint32)
        mixed = _fmix32(padded)
        for lo, s0, s1 in segments.chunks(self._chunk):
            values = self._affine_chunk(mixed[lo : lo + self._chunk])
            seg_min[:, s0:s1] = np.minimum.reduceat(values, segments.starts[s0:s1] - lo, axis=1)
        return seg_min

    def _mersenne_segment_minima(self, padded: np.ndarray, segments: _Segments) -> np.ndarray:
        """Minima of ``((a x + b) mod (2^61 - 1)) & (2^32 - 1)`` over each segment, for every permutation.

        With ``v = (a x + b) mod 2^64`` and ``h = v >> 61`` (0..7), the value is ``L + h (mod 2^32)`` with
        ``L`` the low 32 bits of ``v`` (see :func:`mersenne_folding_fails` for the rare exception, handled
        by the caller). ``L`` needs only 32-bit arithmetic on the low halves of ``a`` and ``b``, at twice
        the SIMD width of 64-bit arithmetic; ``h`` needs the full product. So the chunk is computed in 32
        bits as ``F = L + 7 (mod 2^32)``, and only candidates get the exact 64-bit treatment: if a segment's
        smallest F is ``>= 7``, its minimum is at most that F (an element with ``F >= 7`` cannot wrap) and
        can only come from an element with ``F <= min F + 7`` or with ``F < 7`` (``L`` close enough to
        ``2^32`` to wrap), so those are the candidates; otherwise every element of the segment is one.
        A segment has about one candidate per permutation.
        """
        chunk, num_perm = self._chunk, self.num_perm
        column_bits, perm_bits = chunk.bit_length() - 1, (num_perm - 1).bit_length()
        candidates = self._candidates
        found: list[np.ndarray] = []
        for lo, s0, s1 in segments.chunks(chunk):
            values = self._affine_chunk(padded[lo : lo + chunk])  # F
            bound = np.minimum.reduceat(values, segments.starts[s0:s1] - lo, axis=1)
            bound += np.uint32(_MAX_HIGH)  # below 2 * 7 exactly when min F < 7 or min F + 7 overflows
            np.putmask(bound, bound < 2 * _MAX_HIGH, MAX_HASH)
            np.less_equal(values, np.repeat(bound, segments.lengths[s0:s1], axis=1), out=candidates)
            flat = np.flatnonzero(candidates)  # permutation * chunk + column
            flat += lo << perm_bits  # chunk index in the high bits: (chunk, permutation, column) order
            found.append(flat)
        flat = np.concatenate(found)
        column = flat & (chunk - 1)
        perm = (flat >> column_bits) & ((1 << perm_bits) - 1)
        position = (flat >> (column_bits + perm_bits) << column_bits) | column
        values = self.a[perm] * padded[position].astype(np.uint64)  # wraps mod 2^64, as datasketch's legacy
        values += self.b[perm]
        values += values >> np.uint64(61)
        exact = values.astype(np.uint32)  # the low 32 bits
        # Candidates come sorted by (chunk, permutation, column), so by (permutation, segment) within a
        # chunk: each run of one (permutation, segment) pair is reduced to its minimum.
        segment = segments.index_of_position()[position]
        key = segment * num_perm + perm
        run_starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        seg_min = np.empty((num_perm, len(segments.starts)), dtype=np.uint32)
        seg_min[perm[run_starts], segment[run_starts]] = np.minimum.reduceat(exact, run_starts)
        return seg_min

    def _exact_mersenne_row(self, k: int, hashes: np.ndarray) -> np.ndarray:
        """Permutation k over all hashes with datasketch's formula (the reference arithmetic)."""
        values = self.a[k] * hashes.astype(np.uint64) + self.b[k]
        return (values % MERSENNE_PRIME & MAX_HASH).astype(np.uint32)

    def signatures_from_hashes(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Signatures ``(len(offsets) - 1, num_perm)`` ``uint32`` of the segments ``hashes[offsets[i]:offsets[i+1]]``.

        ``hashes`` are ``uint32`` (as :meth:`shingle_hash_batch` returns them).
        """
        hashes = np.asarray(hashes)
        if hashes.dtype != np.uint32:
            raise TypeError(f"shingle hashes must be uint32, got {hashes.dtype}")
        offsets = np.asarray(offsets, dtype=np.int64)
        out = np.full((len(offsets) - 1, self.num_perm), MAX_HASH, dtype=np.uint32)
        hashes = hashes[offsets[0] : offsets[-1]]  # only what the documents own
        offsets = offsets - offsets[0]
        if len(hashes) == 0:
            return out
        nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
        segments = _Segments(offsets[nonempty], len(hashes), self._chunk)
        # Pad to whole chunks with copies of the last shingle: it belongs to the last document, whose
        # minimum a repeat leaves unchanged.
        padded = np.concatenate(
            (hashes, np.full(segments.padded_length - len(hashes), hashes[-1], dtype=np.uint32))
        )
        with _one_torch_thread():
            if self.scheme == "affine32":
                seg_min = self._affine32_segment_minima(padded, segments)
            else:
                seg_min = self._mersenne_segment_minima(padded, segments)
                for k in self._exact_rows:
                    seg_min[k] = np.minimum.reduceat(self._exact_mersenne_row(k, hashes), segments.starts)
        doc_first_segment = np.searchsorted(segments.starts, offsets[nonempty])
        out[nonempty] = np.minimum.reduceat(seg_min, doc_first_segment, axis=1).T
        return out

    def signatures(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        parts = []
        for lo in range(0, len(texts), batch_size):
            hashes, offsets = self.shingle_hash_batch(texts[lo : lo + batch_size])
            parts.append(self.signatures_from_hashes(hashes, offsets))
        return np.concatenate(parts) if parts else np.empty((0, self.num_perm), dtype=np.uint32)


# ------------------------------------------------------------------------------------------ pipeline step

# (false-positive weight, false-negative weight) of each banding preset.
BANDINGS: dict[str, tuple[float, float]] = {
    "precision": (0.9, 0.1),
    "balanced": (0.5, 0.5),
    "recall": (0.1, 0.9),
}


@register_step("minhash_dedup")
class MinHashDedup(GlobalFilter):
    """Near-duplicate removal: MinHash-LSH clusters over the whole dataset, one document kept per cluster.

    The kept document is the one with the smallest id (ties: first in dataset order); it records its
    cluster's size in ``meta.minhash_cluster_size`` (as FineWeb-2 does, for re-weighting). A removed
    document records the kept one's id in ``meta.duplicate_of`` and its cluster in ``meta.minhash_cluster``
    (``"<task>:<position>"`` of the kept document), which the exclusions output shows.

    ``scheme`` is the permutation family (see :class:`MinHasher`): ``"affine32"`` by default,
    ``"mersenne"`` (the default before 2026-12-04) where a recipe names it. It is part of the run's
    fingerprint, so a run folder started with the other scheme is refused rather than resumed with
    signatures of two families.

    ``banding`` picks (bands, rows) for the threshold: ``"balanced"`` weighs the false-positive and
    false-negative areas under the S-curve equally (datasketch's default), ``"recall"`` weighs false
    negatives 9:1 (more candidates: pairs just above the threshold are found far more often) and
    ``"precision"`` the reverse; ``false_positive_weight``/``false_negative_weight`` set the weights
    directly, ``bands``/``rows`` the banding itself. ``verify`` checks every candidate pair with the exact
    Jaccard similarity of the shingle sets (stored in the pass-1 artifacts), which removes every false
    positive: use it with ``banding: recall``. The reduce splits by LSH bucket across the executor's
    workers (see ``lmforge.data.dedup.lsh``).
    """

    sharded_reduce = True

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        scheme: str = "affine32",
        bands: int | None = None,
        rows: int | None = None,
        banding: str | None = None,
        false_positive_weight: float = 0.5,
        false_negative_weight: float = 0.5,
        verify: bool = False,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if (bands is None) != (rows is None):
            raise ValueError("give both bands and rows, or neither")
        if banding is not None:
            if banding not in BANDINGS:
                raise ValueError(f"banding must be one of {tuple(BANDINGS)}, got {banding!r}")
            if (false_positive_weight, false_negative_weight) != (0.5, 0.5) or bands is not None:
                raise ValueError("give banding, the false positive/negative weights or bands/rows, not two")
            false_positive_weight, false_negative_weight = BANDINGS[banding]
        if bands is None or rows is None:
            bands, rows = optimal_lsh_params(
                threshold, num_perm, false_positive_weight, false_negative_weight
            )
        if bands * rows > num_perm:
            raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {num_perm}")
        self.threshold = threshold
        self.banding = banding
        self.num_perm, self.ngram, self.seed, self.scheme = num_perm, ngram, seed, scheme
        self.bands, self.rows = bands, rows
        self.verify = verify
        self.batch_size = batch_size
        self._hasher: MinHasher | None = None
        self._reset_collection()
        self._decision = ClusterDecision.empty()

    def _reset_collection(self) -> None:
        self._ids: list[str] = []
        self._pending: list[str] = []
        self._signatures: list[np.ndarray] = []
        self._shingles: list[np.ndarray] = []
        self._shingle_counts: list[np.ndarray] = []

    @property
    def hasher(self) -> MinHasher:
        if self._hasher is None:  # built lazily: steps are pickled to workers with configuration only
            self._hasher = MinHasher(self.num_perm, self.ngram, self.seed, self.scheme)
        return self._hasher

    def _flush(self) -> None:
        if not self._pending:
            return
        hashes, offsets = self.hasher.shingle_hash_batch(self._pending)
        self._signatures.append(self.hasher.signatures_from_hashes(hashes, offsets))
        if self.verify:
            sets = [np.unique(hashes[offsets[i] : offsets[i + 1]]) for i in range(len(self._pending))]
            self._shingles.extend(sets)
            self._shingle_counts.append(np.array([len(s) for s in sets], dtype=np.int64))
        self._pending = []

    def start_collect(self, task: int) -> None:
        self._reset_collection()

    def collect(self, doc: Document, position: int) -> None:
        self._ids.append(doc.id)
        self._pending.append(doc.text)
        if len(self._pending) >= self.batch_size:
            self._flush()

    def write_artifact(self, path: Path) -> None:
        self._flush()
        arrays = {
            "ids": np.array(self._ids, dtype=str),
            "signatures": np.concatenate(self._signatures or [np.empty((0, self.num_perm), np.uint32)]),
        }
        if self.verify:
            arrays["shingles"] = np.concatenate(self._shingles or [np.empty(0, np.uint32)])
            arrays["shingle_counts"] = np.concatenate(self._shingle_counts or [np.empty(0, np.int64)])
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
        self._reset_collection()

    def _signature_blocks(self, artifacts: list[Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(dataset indices, signatures) of each artifact in turn: one artifact in memory at a time."""
        offset = 0
        for path in artifacts:
            with np.load(path) as artifact:
                signatures = artifact["signatures"]
            yield np.arange(offset, offset + len(signatures)), signatures
            offset += len(signatures)

    def _shingle_sets(self, artifacts: list[Path], wanted: np.ndarray) -> dict[int, np.ndarray]:
        """The (unique, sorted) shingle sets of the documents ``wanted`` (sorted dataset indices)."""
        sets: dict[int, np.ndarray] = {}
        offset = 0
        for path in artifacts:
            with np.load(path) as artifact:
                counts = artifact["shingle_counts"]
                mine = wanted[(wanted >= offset) & (wanted < offset + len(counts))]
                if len(mine):
                    flat = artifact["shingles"]
                    starts = np.concatenate(([0], np.cumsum(counts)))
                    for k in mine.tolist():
                        sets[k] = flat[starts[k - offset] : starts[k - offset + 1]]
            offset += len(counts)
        return sets

    def _part_edges(self, artifacts: list[Path], part: int, n_parts: int) -> np.ndarray:
        """Near-duplicate edges (dataset indices) found in this part's LSH buckets (checked with the exact
        Jaccard similarity when ``verify``)."""
        blocks = self._signature_blocks(artifacts)
        edges = candidate_edges(blocks, self.bands, self.rows, part, n_parts, all_pairs=self.verify)
        if self.verify:
            edges = verified_edges(edges, self._shingle_sets(artifacts, np.unique(edges)), self.threshold)
        return edges

    def _decide_clusters(self, artifacts: list[Path], edges: np.ndarray, decision_dir: Path) -> None:
        ids = []
        for path in artifacts:
            with np.load(path) as artifact:
                ids.append(artifact["ids"])
        rank, task, position = dataset_ranks(ids)
        # Components over ranks, so each one's smallest member is the document to keep.
        order = np.argsort(rank)
        roots_by_rank = component_roots(len(rank), rank[edges])
        root = order[roots_by_rank[rank]]  # back from rank order to dataset order
        all_ids = np.concatenate(ids) if ids else np.array([], str)
        write_cluster_decision(decision_dir, len(artifacts), task, position, root, all_ids)

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        self._decide_clusters(artifacts, self._part_edges(artifacts, 0, 1), decision_dir)

    def reduce_part(self, artifacts: list[Path], part: int, n_parts: int, out: Path) -> None:
        with open(out, "wb") as handle:
            np.save(handle, self._part_edges(artifacts, part, n_parts))

    def merge_parts(self, artifacts: list[Path], parts: list[Path], decision_dir: Path) -> None:
        edges = np.concatenate([np.load(p) for p in parts] or [np.empty((0, 2), np.int64)])
        self._decide_clusters(artifacts, edges, decision_dir)

    def load_decision(self, decision_dir: Path, task: int) -> None:
        self._decision = load_cluster_decision(decision_dir, task)

    def decide(self, doc: Document) -> str | None:
        if self.position in self._decision.drops:
            doc.meta["duplicate_of"], doc.meta["minhash_cluster"] = self._decision.drops[self.position]
            return "minhash_near_duplicate"
        if self.position in self._decision.sizes:
            doc.meta["minhash_cluster_size"] = self._decision.sizes[self.position]
        return None
