"""What the dataset-level dedup steps share: artifact ids, the keep order, and per-task drop decisions."""

from __future__ import annotations

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


def write_drops(decision_dir: Path, n_tasks: int, task: np.ndarray, position: np.ndarray) -> None:
    """One ``drop-<task>.npy`` per task holding the positions (within the task) to remove."""
    for t in range(n_tasks):
        np.save(Path(decision_dir) / f"drop-{t:05d}.npy", np.sort(position[task == t]))


def load_drops(decision_dir: Path, task: int) -> frozenset[int]:
    return frozenset(np.load(Path(decision_dir) / f"drop-{task:05d}.npy").tolist())
