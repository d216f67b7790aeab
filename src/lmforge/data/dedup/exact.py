"""Exact document de-duplication across the whole dataset (all tasks, all sources).

Two documents are duplicates when their normalized texts (NFKC, lowercase, punctuation stripped,
whitespace collapsed) have the same 128-bit BLAKE2b digest. Of each group the document with the smallest
id is kept (ties: the first in dataset order), with the group's size in ``meta.exact_cluster_size``; a
removed document records the kept one's id in ``meta.duplicate_of`` and the group in ``meta.exact_cluster``
(``"<task>:<position>"`` of the kept document), which the exclusions output shows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import (
    ClusterDecision,
    dataset_ranks,
    load_cluster_decision,
    write_cluster_decision,
)
from lmforge.data.document import Document
from lmforge.data.step import GlobalFilter, register_step
from lmforge.data.text import normalize_for_hash


def document_digest(text: str, normalize: bool = True) -> bytes:
    """16-byte digest of the (normalized) text."""
    canonical = normalize_for_hash(text) if normalize else text
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def digest_roots(digests: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For every document, the index of the smallest-rank document with the same digest ((N, 2) uint64)."""
    order = np.lexsort((rank, digests[:, 1], digests[:, 0]))
    sorted_digests = digests[order]
    new_group = np.concatenate(([True], (sorted_digests[1:] != sorted_digests[:-1]).any(axis=1)))
    leaders = order[new_group]
    root = np.empty(len(digests), dtype=np.int64)
    root[order] = leaders[np.cumsum(new_group) - 1]
    return root


@register_step("exact_dedup")
class ExactDedup(GlobalFilter):
    """Removes documents whose normalized text already occurs elsewhere in the dataset."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self._ids: list[str] = []
        self._digests: list[bytes] = []
        self._decision = ClusterDecision.empty()

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
        ids = np.concatenate([a["ids"] for a in loaded] or [np.array([], str)])
        roots = digest_roots(digests, rank)
        write_cluster_decision(decision_dir, len(artifacts), task, position, roots, ids)

    def load_decision(self, decision_dir: Path, task: int) -> None:
        self._decision = load_cluster_decision(decision_dir, task)

    def decide(self, doc: Document) -> str | None:
        if self.position in self._decision.drops:
            doc.meta["duplicate_of"], doc.meta["exact_cluster"] = self._decision.drops[self.position]
            return "exact_duplicate"
        if self.position in self._decision.sizes:
            doc.meta["exact_cluster_size"] = self._decision.sizes[self.position]
        return None
