"""What the dataset-level dedup steps share: the keep order and the per-task cluster decisions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def dataset_ranks(ids_per_task: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order every collected document by (id, task, position); the smallest is the one a cluster keeps.

    Returns ``(rank, task, position)`` arrays over the concatenation of all tasks' documents, where
    ``rank[k]`` is the place of document ``k`` in that order; ties on ``id`` (ids may repeat across
    sources) fall back to dataset order, so the choice is deterministic for a given input.
    """
    ids = (
        np.concatenate([np.asarray(i, dtype=str) for i in ids_per_task])
        if ids_per_task
        else np.array([], str)
    )
    task = np.concatenate([np.full(len(i), t, dtype=np.int64) for t, i in enumerate(ids_per_task)] or [[]])
    position = np.concatenate([np.arange(len(i), dtype=np.int64) for i in ids_per_task] or [[]])
    order = np.lexsort((position, task, ids))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank, task.astype(np.int64), position.astype(np.int64)


@dataclass(frozen=True)
class ClusterDecision:
    """What a dedup step decided for one task: positions to drop, and the cluster size of each kept
    document that had duplicates (recorded in its meta, so a mixture can up-weight it again)."""

    drops: frozenset[int]
    sizes: dict[int, int]


def write_cluster_decision(
    decision_dir: Path, n_tasks: int, task: np.ndarray, position: np.ndarray, root: np.ndarray
) -> None:
    """``root[k]`` is the index of the document kept for ``k``'s cluster (``k`` itself when kept)."""
    kept = root == np.arange(len(root))
    sizes = np.bincount(root, minlength=len(root))
    for t in range(n_tasks):
        mine = task == t
        shared = mine & kept & (sizes > 1)
        np.savez(
            Path(decision_dir) / f"task-{t:05d}.npz",
            drop=np.sort(position[mine & ~kept]),
            kept=position[shared],
            size=sizes[shared],
        )


def load_cluster_decision(decision_dir: Path, task: int) -> ClusterDecision:
    with np.load(Path(decision_dir) / f"task-{task:05d}.npz") as data:
        sizes = dict(zip(data["kept"].tolist(), data["size"].tolist()))
        return ClusterDecision(frozenset(data["drop"].tolist()), sizes)
