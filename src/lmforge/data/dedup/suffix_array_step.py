"""Exact-substring dedup (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better").

A span of at least ``min_bytes`` UTF-8 bytes that occurs more than once in the dataset is cut out of the
documents: with ``keep: first`` (the default) every occurrence but the first in dataset order (task, then
position, then offset) is cut, so one copy of the text survives; with ``keep: none`` every occurrence is
cut, as Lee et al.'s released tool does. Precisely, byte ``i`` of a document is cut iff it lies in a
``min_bytes``-byte window (inside one document) whose content also starts at another position (an
earlier one for ``first``). The cut is widened to whole UTF-8 characters. Windows never cross documents.
The repeats are found with a suffix array (``lmforge.data.dedup.suffix_array``).

Pass 1 stores each task's documents as bytes (artifact folder: ``data.npy`` + ``lengths.npy``). The
barrier cuts the dataset, in dataset order, into shards of at most ``shard_bytes`` bytes (``0``: one shard;
a document larger than ``shard_bytes`` is a shard by itself) and builds one suffix array per **pair** of
shards (or one over the only shard). A window is marked iff its repeat lies in the same shard or in some
other one, and every pair of shards is looked at once, so the sharded result is exactly the unsharded one
while no suffix array holds more than two shards (S shards: S (S - 1) / 2 builds; the pairs are the
independent parts of a sharded reduce, run on the executor's workers).

A trimmed document stays in the output; its exclusion record (reason ``duplicate_spans``) holds the
original text with ``meta.removed_spans`` (byte ``[start, end)`` ranges of the original UTF-8) and
``meta.removed_bytes``; a document left with only whitespace is removed (``only_duplicate_spans``).
Counters: ``substring_docs_changed``, ``substring_bytes_removed``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from lmforge.data.dedup.suffix_array import (
    concatenate_documents,
    cover,
    mask_spans,
    repeated_starts,
    widen_to_characters,
)
from lmforge.data.document import Document
from lmforge.data.step import GlobalStep, register_step


class _Corpus:
    """The collected documents of every task, addressed in dataset order, read from memory-mapped files."""

    def __init__(self, artifacts: list[Path]) -> None:
        lengths = [np.load(Path(a) / "lengths.npy") for a in artifacts]
        # Memory-mapped: only the shards being matched are read (numpy cannot map an empty array).
        self.data = [
            np.load(Path(a) / "data.npy", mmap_mode="r" if x.sum() else None)
            for a, x in zip(artifacts, lengths)
        ]
        self.task = np.concatenate([np.full(len(x), t, np.int64) for t, x in enumerate(lengths)] or [[]])
        self.position = np.concatenate([np.arange(len(x), dtype=np.int64) for x in lengths] or [[]])
        self.length = np.concatenate(lengths or [np.empty(0, np.int64)]).astype(np.int64)
        offsets = [np.concatenate(([0], np.cumsum(x)[:-1])).astype(np.int64) for x in lengths if len(x)]
        self.offset = np.concatenate(offsets or [np.empty(0, np.int64)])
        self.task = self.task.astype(np.int64)
        self.position = self.position.astype(np.int64)

    def bytes_of(self, doc: int) -> np.ndarray:
        start = int(self.offset[doc])
        return np.asarray(self.data[int(self.task[doc])][start : start + int(self.length[doc])])

    def shards(self, shard_bytes: int) -> list[range]:
        """Contiguous ranges of documents of at most ``shard_bytes`` bytes each (0: all in one)."""
        n = len(self.length)
        if shard_bytes <= 0 or n == 0:
            return [range(n)] if n else []
        out, begin, size = [], 0, 0
        for doc, length in enumerate(self.length.tolist()):
            if doc > begin and size + length > shard_bytes:
                out.append(range(begin, doc))
                begin, size = doc, 0
            size += length
        out.append(range(begin, n))
        return out


def _pairs(n_shards: int) -> list[tuple[int, int]]:
    return [(0, 0)] if n_shards == 1 else list(itertools.combinations(range(n_shards), 2))


@register_step("exact_substring_dedup")
class ExactSubstringDedup(GlobalStep):
    """Cuts spans of ``min_bytes`` or more UTF-8 bytes that occur elsewhere in the dataset (see module)."""

    sharded_reduce = True

    def __init__(self, min_bytes: int = 100, keep: str = "first", shard_bytes: int = 0) -> None:
        super().__init__()
        if min_bytes < 1:
            raise ValueError("min_bytes must be positive")
        if keep not in ("first", "none"):
            raise ValueError(f"keep must be 'first' or 'none', got {keep!r}")
        if shard_bytes < 0:
            raise ValueError("shard_bytes must be 0 (one shard) or positive")
        self.min_bytes = min_bytes
        self.keep = keep
        self.shard_bytes = shard_bytes
        self._chunks: list[bytes] = []
        self._cuts: dict[int, np.ndarray] = {}

    # --- pass 1 ---------------------------------------------------------------------------------------

    def start_collect(self, task: int) -> None:
        self._chunks = []

    def collect(self, doc: Document, position: int) -> None:
        self._chunks.append(doc.text.encode("utf-8"))

    def write_artifact(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "data.npy", np.frombuffer(b"".join(self._chunks), dtype=np.uint8))
        np.save(path / "lengths.npy", np.array([len(c) for c in self._chunks], dtype=np.int64))
        self._chunks = []

    # --- barrier --------------------------------------------------------------------------------------

    def marked_starts(self, corpus: _Corpus, docs: list[int]) -> dict[int, np.ndarray]:
        """Document -> offsets of its marked windows, from one suffix array over ``docs`` (dataset order)."""
        values, starts = concatenate_documents([corpus.bytes_of(d) for d in docs])
        hits = repeated_starts(values, self.min_bytes, self.keep)
        owner = np.searchsorted(starts, hits, side="right") - 1  # hits are sorted, so owner is too
        mine, first = np.unique(owner, return_index=True)
        groups = np.split(hits, first[1:])
        return {docs[j]: group - starts[j] for j, group in zip(mine.tolist(), groups)}

    def reduce_part(self, artifacts: list[Path], part: int, n_parts: int, out: Path) -> None:
        corpus = _Corpus(artifacts)
        shards = corpus.shards(self.shard_bytes)
        found: dict[int, list[np.ndarray]] = {}
        for a, b in _pairs(len(shards))[part::n_parts]:
            docs = list(shards[a]) if a == b else [*shards[a], *shards[b]]
            for doc, offsets in self.marked_starts(corpus, docs).items():
                found.setdefault(doc, []).append(offsets)
        doc_ids = np.array(sorted(found), dtype=np.int64)
        parts = [np.unique(np.concatenate(found[d])) for d in doc_ids.tolist()]
        counts = np.array([len(p) for p in parts], dtype=np.int64)
        with open(out, "wb") as handle:
            np.savez(
                handle, docs=doc_ids, counts=counts, offsets=np.concatenate(parts or [np.empty(0, np.int64)])
            )

    def merge_parts(self, artifacts: list[Path], parts: list[Path], decision_dir: Path) -> None:
        corpus = _Corpus(artifacts)
        found: dict[int, list[np.ndarray]] = {}
        for path in parts:
            with np.load(path) as data:
                split = (
                    np.split(data["offsets"], np.cumsum(data["counts"])[:-1]) if len(data["counts"]) else []
                )
                for doc, offsets in zip(data["docs"].tolist(), split):
                    found.setdefault(doc, []).append(offsets)
        per_task: dict[int, tuple[list[int], list[np.ndarray]]] = {t: ([], []) for t in range(len(artifacts))}
        for doc in sorted(found):
            data = corpus.bytes_of(doc)
            mask = cover(np.unique(np.concatenate(found[doc])), self.min_bytes, len(data))
            spans = mask_spans(widen_to_characters(data, mask))
            positions, cuts = per_task[int(corpus.task[doc])]
            positions.append(int(corpus.position[doc]))
            cuts.append(spans)
        for task, (positions, cuts) in per_task.items():
            np.savez(
                Path(decision_dir) / f"task-{task:05d}.npz",
                positions=np.array(positions, dtype=np.int64),
                counts=np.array([len(c) for c in cuts], dtype=np.int64),
                spans=np.concatenate(cuts or [np.empty((0, 2), np.int64)]).reshape(-1, 2),
            )

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        part = Path(decision_dir) / "part.npz.tmp"
        self.reduce_part(artifacts, 0, 1, part)
        self.merge_parts(artifacts, [part], decision_dir)
        part.unlink()

    # --- pass 2 ---------------------------------------------------------------------------------------

    def load_decision(self, decision_dir: Path, task: int) -> None:
        with np.load(Path(decision_dir) / f"task-{task:05d}.npz") as data:
            counts = data["counts"]
            split = np.split(data["spans"], np.cumsum(counts)[:-1]) if len(counts) else []
            self._cuts = dict(zip(data["positions"].tolist(), split))

    def process(self, doc: Document) -> Document | None:
        spans = self._cuts.get(self.position)
        if spans is None or not len(spans):
            return doc
        data = doc.text.encode("utf-8")
        pieces, previous = [], 0
        for start, end in spans.tolist():
            pieces.append(data[previous:start])
            previous = end
        pieces.append(data[previous:])
        removed = int((spans[:, 1] - spans[:, 0]).sum())
        self.stats.counters["substring_docs_changed"] += 1
        self.stats.counters["substring_bytes_removed"] += removed
        text = b"".join(pieces).decode("utf-8")
        audit = Document(
            doc.id, doc.text, {**doc.meta, "removed_spans": spans.tolist(), "removed_bytes": removed}
        )
        if not text.strip():
            self.remove(audit, "only_duplicate_spans")
            return None
        if self.exclude is not None:
            self.exclude(audit, self.name, "duplicate_spans")
        doc.text = text
        return doc
