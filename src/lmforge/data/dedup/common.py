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
    """What a dedup step decided for one task. ``drops``: position -> (id of the document kept in its
    place, cluster id), so every removal can be audited; ``sizes``: the cluster size of each kept
    document that had duplicates (recorded in its meta, so a mixture can up-weight it again). A cluster id
    is ``"<task>:<position>"`` of the cluster's kept document: unique in the run even where ids repeat."""

    drops: dict[int, tuple[str, str]]
    sizes: dict[int, int]

    @classmethod
    def empty(cls) -> ClusterDecision:
        return cls({}, {})


def write_cluster_decision(
    decision_dir: Path,
    n_tasks: int,
    task: np.ndarray,
    position: np.ndarray,
    root: np.ndarray,
    ids: np.ndarray,
) -> None:
    """``root[k]`` is the index of the document kept for ``k``'s cluster (``k`` itself when kept);
    ``ids[k]`` is document ``k``'s id."""
    kept = root == np.arange(len(root))
    sizes = np.bincount(root, minlength=len(root))
    for t in range(n_tasks):
        mine = task == t
        dropped = np.flatnonzero(mine & ~kept)
        shared = mine & kept & (sizes > 1)
        np.savez(
            Path(decision_dir) / f"task-{t:05d}.npz",
            drop=position[dropped],
            drop_kept_id=np.asarray(ids)[root[dropped]],
            drop_kept_task=task[root[dropped]],
            drop_kept_position=position[root[dropped]],
            kept=position[shared],
            size=sizes[shared],
        )


def load_cluster_decision(decision_dir: Path, task: int) -> ClusterDecision:
    with np.load(Path(decision_dir) / f"task-{task:05d}.npz") as data:
        clusters = [
            f"{t}:{p}" for t, p in zip(data["drop_kept_task"].tolist(), data["drop_kept_position"].tolist())
        ]
        drops = dict(zip(data["drop"].tolist(), zip(data["drop_kept_id"].tolist(), clusters)))
        return ClusterDecision(drops, dict(zip(data["kept"].tolist(), data["size"].tolist())))
