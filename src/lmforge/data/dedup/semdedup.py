"""Semantic de-duplication (SemDeDup, Abbas et al. 2023): near-identical meaning, not near-identical text.

Each document gets an embedding -- from its ``meta`` (``source: meta``, key ``meta_key``: a list of
floats, e.g. written by ``lmforge embed encode``), or from an OpenAI-compatible ``/v1/embeddings``
endpoint (``source: endpoint``: ``url``/``model``, the key in the environment variable ``api_key_env``;
requests of ``batch_size`` texts). The data layer never loads a model itself.

At the barrier the L2-normalised embeddings are clustered with spherical k-means (``n_clusters``; 0 means
``round(sqrt(n))``; k-means++ seeding from ``seed``, ``kmeans_iters`` Lloyd steps on cosine similarity).
Inside each cluster the documents are put in keep order -- ``keep: first`` (dataset order, as the other
dedup steps) or ``keep: far_from_centroid`` (the paper's choice: least similar to the centroid first) --
and a document is removed when its cosine similarity to any document before it in that order is above
``threshold`` (the paper's ``1 - eps``). Comparing only inside clusters is what makes it affordable: about
``n^2 / k`` similarities instead of ``n^2``.

A removed document (reason ``semantic_duplicate``) records in its meta ``duplicate_of`` (the id of the most
similar earlier document), ``semantic_similarity`` and ``semantic_cluster``, which the exclusion output
shows. A document whose embedding is missing or malformed is rejected with the reason (in pass 1 for
``meta``; in pass 2 for the endpoint, whose requests are batched) and takes no part.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.document import Document
from lmforge.data.step import GlobalFilter, register_step

SOURCES = ("meta", "endpoint")
KEEP_ORDERS = ("first", "far_from_centroid")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(assignment, centroids)`` of unit rows ``x`` into ``k`` clusters by cosine similarity (k-means++
    seeding, then Lloyd steps; an emptied cluster is re-seeded with the point least similar to its own)."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[rng.integers(n)]
    closest = 1.0 - x @ centroids[0]  # cosine distance to the nearest centroid so far
    for c in range(1, k):
        weights = np.maximum(closest, 0.0) ** 2
        pick = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centroids[c] = x[pick]
        closest = np.minimum(closest, 1.0 - x @ centroids[c])
    assignment = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        similarity = x @ centroids.T
        new = similarity.argmax(axis=1)
        for c in np.setdiff1d(np.arange(k), new):  # re-seed empty clusters
            new[int(np.argmin(similarity[np.arange(n), new]))] = c
        if _ > 0 and np.array_equal(new, assignment):
            break
        assignment = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, x)
        centroids = normalize_rows(sums)
    return assignment, centroids


def semantic_duplicates(
    x: np.ndarray, assignment: np.ndarray, order_key: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For unit rows ``x`` clustered by ``assignment``: ``(removed, duplicate_of, similarity)``, where row
    ``i`` is removed when some row ``j`` of its cluster with a smaller ``order_key`` has ``x_i . x_j >
    threshold``; ``duplicate_of[i]`` is the most similar such ``j`` (-1 if kept)."""
    n = len(x)
    removed = np.zeros(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    best = np.full(n, np.nan)
    for cluster in np.unique(assignment):
        members = np.flatnonzero(assignment == cluster)
        members = members[np.argsort(order_key[members], kind="stable")]
        if len(members) < 2:
            continue
        sims = x[members] @ x[members].T
        sims[np.tril_indices(len(members))] = -np.inf  # only earlier (row) vs later (column)
        earlier = sims.argmax(axis=0)
        top = sims[earlier, np.arange(len(members))]
        hit = top > threshold
        removed[members[hit]] = True
        duplicate_of[members[hit]] = members[earlier[hit]]
        best[members[hit]] = top[hit]
    return removed, duplicate_of, best


@register_step("semdedup")
class SemDeDup(GlobalFilter):
    """Removes documents whose embedding is within ``threshold`` cosine of an earlier one in its k-means
    cluster (see the module docstring)."""

    def __init__(
        self,
        source: str = "meta",
        meta_key: str = "embedding",
        url: str = "http://127.0.0.1:8000",
        model: str = "lmforge",
        api_key_env: str = "OPENAI_API_KEY",
        batch_size: int = 64,
        n_clusters: int = 0,
        threshold: float = 0.95,
        keep: str = "first",
        kmeans_iters: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if keep not in KEEP_ORDERS:
            raise ValueError(f"keep must be one of {KEEP_ORDERS}, got {keep!r}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if n_clusters < 0 or batch_size < 1:
            raise ValueError("n_clusters must be >= 0 and batch_size >= 1")
        self.source, self.meta_key = source, meta_key
        self.url, self.model, self.api_key_env, self.batch_size = url, model, api_key_env, batch_size
        self.n_clusters, self.threshold, self.keep = n_clusters, threshold, keep
        self.kmeans_iters, self.seed = kmeans_iters, seed
        self._endpoint: Any = None
        self._ids: list[str] = []
        self._vectors: list[np.ndarray | None] = []
        self._errors: list[str] = []
        self._pending: list[tuple[int, str]] = []
        self._drops: dict[int, tuple[str, float, int]] = {}
        self._failed: dict[int, str] = {}
        self._dim: int | None = None

    # --- embeddings -----------------------------------------------------------------------------------

    def _embed_texts(self, texts: list[str]) -> list[list[float]]:
        if self._endpoint is None:
            from lmforge.data.synthetic import Endpoint

            self._endpoint = Endpoint(
                url=self.url, model=self.model, api_key=os.environ.get(self.api_key_env)
            )
        data = self._endpoint.post("/v1/embeddings", {"input": texts}).get("data")
        if not isinstance(data, list) or len(data) != len(texts):
            raise ValueError(f"/v1/embeddings answered {len(data) if isinstance(data, list) else 'no'} items")
        by_index = sorted(data, key=lambda item: item.get("index", 0))
        return [item["embedding"] for item in by_index]

    def _flush(self) -> None:
        """Fetch the pending texts' embeddings; a failed batch is retried text by text, so one bad text
        fails only its own document."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            vectors = self._embed_texts([text for _, text in pending])
        except Exception:  # find out which texts the endpoint cannot embed
            vectors = []
            for index, text in pending:
                try:
                    vectors.append(self._embed_texts([text])[0])
                except Exception as err:
                    vectors.append(None)
                    self._errors[index] = f"embedding request failed: {type(err).__name__}: {err}"[:300]
        for (index, _), vector in zip(pending, vectors):
            if vector is not None:
                try:
                    self._vectors[index] = self._check_vector(vector, "the endpoint's embedding")
                except ValueError as err:
                    self._errors[index] = str(err)

    def _check_vector(self, value: Any, what: str) -> np.ndarray:
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"{what} must be a non-empty list of numbers")
        try:
            vector = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a list of numbers") from None
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise ValueError(f"{what} must be a flat list of finite numbers")
        if self._dim is not None and len(vector) != self._dim:
            raise ValueError(f"{what} has {len(vector)} dimensions, the others {self._dim}")
        self._dim = len(vector)
        return vector

    # --- pass 1 ---------------------------------------------------------------------------------------

    def start_collect(self, task: int) -> None:
        self._ids, self._vectors, self._errors, self._pending = [], [], [], []
        self._dim = None

    def collect(self, doc: Document, position: int) -> None:
        if self.source == "meta":
            vector = self._check_vector(doc.meta.get(self.meta_key), f"meta.{self.meta_key}")
            self._vectors.append(vector)
            self._errors.append("")
        else:
            self._vectors.append(None)
            self._errors.append("")
            self._pending.append((position, doc.text))
            if len(self._pending) >= self.batch_size:
                self._flush()
        self._ids.append(doc.id)

    def write_artifact(self, path: Path) -> None:
        self._flush()
        for i, vector in enumerate(self._vectors):
            if vector is None and not self._errors[i]:
                self._errors[i] = "no embedding"
        dims = {len(v) for v in self._vectors if v is not None}
        dim = dims.pop() if dims else 0
        matrix = np.zeros((len(self._vectors), dim), dtype=np.float32)
        for i, vector in enumerate(self._vectors):
            if vector is not None and len(vector) == dim:
                matrix[i] = vector
        with open(path, "wb") as handle:
            np.savez(
                handle, ids=np.array(self._ids, dtype=str), vectors=matrix, errors=np.array(self._errors, str)
            )

    # --- barrier --------------------------------------------------------------------------------------

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        loaded = [np.load(p) for p in artifacts]
        ids = np.concatenate([a["ids"] for a in loaded] or [np.array([], str)])
        errors = np.concatenate([a["errors"] for a in loaded] or [np.array([], str)])
        task = np.concatenate([np.full(len(a["ids"]), t, np.int64) for t, a in enumerate(loaded)] or [[]])
        position = np.concatenate([np.arange(len(a["ids"]), dtype=np.int64) for a in loaded] or [[]])
        dims = {a["vectors"].shape[1] for a in loaded if len(a["ids"]) and a["vectors"].shape[1]}
        if len(dims) > 1:
            raise ValueError(f"semdedup: the tasks' embeddings have different dimensions {sorted(dims)}")
        usable = np.flatnonzero(errors == "")
        removed = np.zeros(len(ids), dtype=bool)
        duplicate_of = np.full(len(ids), -1, dtype=np.int64)
        similarity = np.full(len(ids), np.nan)
        cluster = np.full(len(ids), -1, dtype=np.int64)
        if len(usable):
            dim = dims.pop()  # a task with no usable embedding stored (n, 0): none of its rows is used
            blocks = [
                a["vectors"] if a["vectors"].shape[1] == dim else np.zeros((len(a["ids"]), dim))
                for a in loaded
            ]
            x = normalize_rows(np.concatenate(blocks).astype(np.float64)[usable])
            k = self.n_clusters or max(1, round(len(usable) ** 0.5))
            assignment, centroids = spherical_kmeans(x, k, self.kmeans_iters, self.seed)
            if self.keep == "first":
                order_key = np.arange(len(usable), dtype=np.float64)
            else:  # the least typical first: ascending similarity to the centroid
                order_key = (x * centroids[assignment]).sum(axis=1)
            r, d, s = semantic_duplicates(x, assignment, order_key, self.threshold)
            removed[usable] = r
            duplicate_of[usable[r]] = usable[d[r]]
            similarity[usable] = s
            cluster[usable] = assignment
        for t in range(len(artifacts)):
            mine = task == t
            drop = np.flatnonzero(mine & removed)
            failed = np.flatnonzero(mine & (errors != ""))
            np.savez(
                Path(decision_dir) / f"task-{t:05d}.npz",
                drop=position[drop],
                kept_id=ids[duplicate_of[drop]] if len(drop) else np.array([], str),
                similarity=similarity[drop],
                cluster=cluster[drop],
                failed=position[failed],
                error=errors[failed],
            )

    # --- pass 2 ---------------------------------------------------------------------------------------

    def load_decision(self, decision_dir: Path, task: int) -> None:
        with np.load(Path(decision_dir) / f"task-{task:05d}.npz") as data:
            self._drops = {
                p: (i, s, c)
                for p, i, s, c in zip(
                    data["drop"].tolist(),
                    data["kept_id"].tolist(),
                    data["similarity"].tolist(),
                    data["cluster"].tolist(),
                )
            }
            self._failed = dict(zip(data["failed"].tolist(), data["error"].tolist()))

    def decide(self, doc: Document) -> str | None:
        if self.position in self._failed:
            raise ValueError(self._failed[self.position])
        if self.position in self._drops:
            kept_id, sim, cluster = self._drops[self.position]
            doc.meta["duplicate_of"] = kept_id
            doc.meta["semantic_similarity"] = round(float(sim), 6)
            doc.meta["semantic_cluster"] = int(cluster)
            return "semantic_duplicate"
        return None
