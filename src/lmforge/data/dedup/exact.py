"""Exact document de-duplication across the whole dataset (all tasks, all sources).

Two documents are duplicates when their normalized texts (NFKC, lowercase, punctuation stripped,
whitespace collapsed) have the same 128-bit BLAKE2b digest. Of each group the document with the smallest
id is kept (ties: the first in dataset order).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import dataset_ranks, load_drops, write_drops
from lmforge.data.document import Document
from lmforge.data.step import GlobalFilter, register_step
from lmforge.data.text import normalize_for_hash


def document_digest(text: str, normalize: bool = True) -> bytes:
    """16-byte digest of the (normalized) text."""
    canonical = normalize_for_hash(text) if normalize else text
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def duplicate_mask(digests: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """True for every document whose digest (an (N, 2) uint64 array) also belongs to one of smaller rank."""
    order = np.lexsort((rank, digests[:, 1], digests[:, 0]))
    sorted_digests = digests[order]
    repeat = np.concatenate(([False], (sorted_digests[1:] == sorted_digests[:-1]).all(axis=1)))
    mask = np.zeros(len(digests), dtype=bool)
    mask[order] = repeat
    return mask


@register_step("exact_dedup")
class ExactDedup(GlobalFilter):
    """Removes documents whose normalized text already occurs elsewhere in the dataset."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self._ids: list[str] = []
        self._digests: list[bytes] = []
        self._drops: frozenset[int] = frozenset()

    def start_collect(self, task: int) -> None:
        self._ids, self._digests = [], []

    def collect(self, doc: Document, position: int) -> None:
        self._digests.append(document_digest(doc.text, self.normalize))
        self._ids.append(doc.id)

    def write_artifact(self, path: Path) -> None:
        with open(path, "wb") as handle:
            digests = np.frombuffer(b"".join(self._digests), dtype=np.uint64).reshape(-1, 2)
            np.savez(handle, ids=np.array(self._ids, dtype=str), digests=digests)

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        loaded = [np.load(p) for p in artifacts]
        rank, task, position = dataset_ranks([a["ids"] for a in loaded])
        digests = np.concatenate([a["digests"] for a in loaded] or [np.empty((0, 2), np.uint64)])
        drop = duplicate_mask(digests, rank)
        write_drops(decision_dir, len(artifacts), task[drop], position[drop])

    def load_decision(self, decision_dir: Path, task: int) -> None:
        self._drops = load_drops(decision_dir, task)

    def decide(self, doc: Document) -> str | None:
        return "exact_duplicate" if self.position in self._drops else None
