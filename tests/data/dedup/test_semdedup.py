"""SemDeDup against a brute-force reference: every pair of documents compared."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest

from lmforge.data.dedup.semdedup import SemDeDup, spherical_kmeans
from lmforge.data.document import Document
from lmforge.data.step import STEPS

from .conftest import run_two_passes


def brute_force(vectors: list[np.ndarray], clusters: list[int], threshold: float) -> set[int]:
    """Indices removed: a later document of the same cluster within ``threshold`` cosine of an earlier one."""
    unit = [v / np.linalg.norm(v) for v in vectors]
    removed = set()
    for i in range(len(unit)):
        for j in range(i):
            if clusters[i] == clusters[j] and float(unit[i] @ unit[j]) > threshold:
                removed.add(i)
    return removed


def clustered_corpus(seed: int, n_centres: int = 4, per_centre: int = 12, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_centres] * 10  # orthogonal: k-means recovers them
    vectors, truth = [], []
    for c in range(n_centres):
        for _ in range(per_centre):
            vectors.append(centres[c] + rng.normal(scale=rng.choice([0.05, 1.0]), size=dim))
            truth.append(c)
    order = rng.permutation(len(vectors))
    return [vectors[i] for i in order], [truth[i] for i in order]


def as_tasks(vectors, n_tasks=3):
    docs = [Document(f"d{i}", f"text {i}", {"embedding": v.tolist()}) for i, v in enumerate(vectors)]
    return [docs[t::n_tasks] for t in range(n_tasks)]


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_one_cluster_is_all_pairs_brute_force(tmp_path, threshold) -> None:
    vectors, _ = clustered_corpus(0)
    tasks = as_tasks(vectors, n_tasks=1)
    kept = run_two_passes(SemDeDup(n_clusters=1, threshold=threshold), tasks, tmp_path)
    removed = brute_force(vectors, [0] * len(vectors), threshold)
    assert {d.id for d in kept[0]} == {f"d{i}" for i in range(len(vectors)) if i not in removed}


@pytest.mark.parametrize("threshold", [0.6, 0.95])
def test_kmeans_clusters_then_pairs_inside_them(tmp_path, threshold) -> None:
    vectors, truth = clustered_corpus(1)
    unit = np.stack([v / np.linalg.norm(v) for v in vectors])
    assignment, _ = spherical_kmeans(unit, 4, seed=0)
    # k-means found the planted clusters (same partition, any labels)
    assert len({(a, t) for a, t in zip(assignment.tolist(), truth)}) == 4
    # tasks are interleaved, so dataset order (task, position) differs from the index order
    tasks = as_tasks(vectors)
    order = [int(d.id[1:]) for task in tasks for d in task]
    step = SemDeDup(n_clusters=4, threshold=threshold)
    kept = run_two_passes(step, tasks, tmp_path)
    removed = brute_force([vectors[i] for i in order], [truth[i] for i in order], threshold)
    expected = {f"d{order[k]}" for k in range(len(order)) if k not in removed}
    assert {d.id for task in kept for d in task} == expected
    assert removed and step.stats.removed == {"semantic_duplicate": len(removed)}


def test_removed_documents_say_what_they_duplicate(tmp_path) -> None:
    assert STEPS["semdedup"] is SemDeDup
    tasks = [
        [Document("a", "x", {"embedding": [1.0, 0.0]}), Document("b", "y", {"embedding": [0.0, 1.0]})],
        [Document("c", "x'", {"embedding": [0.99, 0.05]}), Document("bad", "z", {"embedding": "nope"})],
        [],  # an empty task and one whose only document has no embedding
        [Document("bad2", "w", {})],
    ]
    step = SemDeDup(n_clusters=1, threshold=0.9)
    rejected = []
    step.reject = lambda doc, name, reason: rejected.append((doc.id, reason))
    # as the executor does: pass 1 passes on the documents it did not reject, pass 2 sees those
    passed = [list(step.collect_stream(iter(t), i, tmp_path / f"a{i}")) for i, t in enumerate(tasks)]
    (tmp_path / "decision").mkdir()
    step.reduce([tmp_path / f"a{i}" for i in range(len(tasks))], tmp_path / "decision")
    kept = [list(step.apply_stream(iter(t), tmp_path / "decision", i)) for i, t in enumerate(passed)]
    assert [[d.id for d in t] for t in kept] == [["a", "b"], [], [], []]
    reason = "semdedup: ValueError: meta.embedding must be a non-empty list of numbers"
    assert rejected == [("bad", reason), ("bad2", reason)]
    dropped = tasks[1][0]
    assert dropped.meta["duplicate_of"] == "a" and dropped.meta["semantic_similarity"] > 0.99


def test_far_from_centroid_keeps_the_least_typical(tmp_path) -> None:
    vectors = [[1.0, 0.0], [1.0, 0.05], [1.0, 0.3]]  # cosines: 0-1 0.9988, 1-2 0.9710, 0-2 0.9578

    def kept(keep: str, name: str) -> list[str]:
        tasks = [[Document(str(i), "t", {"embedding": v}) for i, v in enumerate(vectors)]]
        (tmp_path / name).mkdir()
        step = SemDeDup(n_clusters=1, threshold=0.96, keep=keep)
        return [d.id for d in run_two_passes(step, tasks, tmp_path / name)[0]]

    # dataset order: 0 kept, 1 (0.9988 to 0) and 2 (0.9710 to 1, removed or not) go
    assert kept("first", "a") == ["0"]
    # centroid similarity 2 < 0 < 1: 2 kept, 0 stays (0.9578 to 2), 1 goes (0.9710 to 2)
    assert kept("far_from_centroid", "b") == ["0", "2"]


class FakeEmbeddings(BaseHTTPRequestHandler):
    """An OpenAI-shaped /v1/embeddings: letter counts as the vector; a text with FAIL is refused (400)."""

    requests: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = body["input"]
        FakeEmbeddings.requests.append(len(texts))
        if any("FAIL" in t for t in texts):
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b"bad input")
            return
        data = [
            {"object": "embedding", "index": i, "embedding": [t.count(c) + 0.01 for c in "abcdefgh"]}
            for i, t in reversed(list(enumerate(texts)))  # any order: the index says which is which
        ]
        payload = json.dumps({"object": "list", "data": data, "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_embeddings_from_an_endpoint(tmp_path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEmbeddings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        texts = ["aaab", "aaabb", "hhhg", "FAIL here", "ccd", "aaab ", "hhhgg"]
        tasks = [[Document(str(i), t) for i, t in enumerate(texts)]]
        step = SemDeDup(source="endpoint", url=f"http://127.0.0.1:{server.server_port}", batch_size=4, n_clusters=1, threshold=0.98)  # fmt: skip
        rejected = []
        step.reject = lambda doc, name, reason: rejected.append((doc.id, reason))
        kept = run_two_passes(step, tasks, tmp_path)
    finally:
        server.shutdown()
    vectors = [np.array([t.count(c) + 0.01 for c in "abcdefgh"]) for t in texts]
    usable = [i for i, t in enumerate(texts) if "FAIL" not in t]
    removed = brute_force([vectors[i] for i in usable], [0] * len(usable), 0.98)
    assert [d.id for d in kept[0]] == [str(usable[k]) for k in range(len(usable)) if k not in removed]
    assert removed  # "aaab " repeats "aaab"
    assert [r[0] for r in rejected] == ["3"] and "embedding request failed" in rejected[0][1]
    assert FakeEmbeddings.requests[:2] == [4, 1]  # a batch, then its texts one by one after a refusal


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="source"):
        SemDeDup(source="model")
    with pytest.raises(ValueError, match="threshold"):
        SemDeDup(threshold=2.0)


def test_the_shipped_recipe_runs_both_steps(tmp_path) -> None:
    """``recipes/data/substring_dedup.yaml`` on documents with embeddings in meta (as ``embed encode`` writes)."""
    import gzip
    from pathlib import Path

    from lmforge.data.recipe import run_recipe

    recipe = Path(__file__).parents[3] / "recipes" / "data" / "substring_dedup.yaml"
    shared = "A paragraph that two documents share, well over the hundred byte threshold of the step, so it is cut. "
    records = [
        {
            "id": "a",
            "text": "First document. " + shared + "Its own end.",
            "meta": {"embedding": [1.0, 0.0, 0.0]},
        },
        {
            "id": "b",
            "text": "Second document! " + shared + "Another end.",
            "meta": {"embedding": [0.0, 1.0, 0.0]},
        },
        {"id": "c", "text": "Same meaning, other words.", "meta": {"embedding": [0.999, 0.01, 0.0]}},
    ]
    raw = tmp_path / "raw.jsonl.gz"
    raw.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    overrides = [
        f"inputs=[{{paths: ['{raw}'], source: t}}]",
        f"output.path={tmp_path / 'out'}",
        f"run_dir={tmp_path / 'run'}",
        "workers=1",
    ]
    report = run_recipe(recipe, overrides, progress=False)
    assert report.balanced
    out = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.gz")) for line in gzip.decompress(f.read_bytes()).decode().splitlines()]  # fmt: skip
    assert {r["id"]: r["text"] for r in out} == {
        "a": "First document. " + shared + "Its own end.",
        "b": "Second document!Another end.",  # the space before the paragraph is shared too
    }
