"""Suffix-array exact-substring dedup against brute force: every window of every document compared."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.dedup.suffix_array import (
    concatenate_documents,
    kgram_groups,
    repeated_starts,
    suffix_array,
    widen_to_characters,
)
from lmforge.data.dedup.suffix_array_step import ExactSubstringDedup
from lmforge.data.document import Document
from lmforge.data.step import STEPS

from .conftest import run_two_passes


def brute_force(tasks: list[list[str]], k: int, keep: str) -> list[list[str]]:
    """Texts after cutting, by the definition: compare every k-byte window with every other one."""
    docs = [text.encode() for task in tasks for text in task]
    windows: dict[bytes, list[tuple[int, int]]] = {}
    for d, data in enumerate(docs):
        for off in range(len(data) - k + 1):
            windows.setdefault(data[off : off + k], []).append((d, off))
    masks = [[False] * len(data) for data in docs]
    for occurrences in windows.values():
        if len(occurrences) > 1:
            for d, off in occurrences[1:] if keep == "first" else occurrences:
                for i in range(off, off + k):
                    masks[d][i] = True
    out, d = [], 0
    for task in tasks:
        kept = []
        for text in task:
            pieces, at = [], 0
            for char in text:  # a character goes if any of its bytes is cut
                size = len(char.encode())
                if not any(masks[d][at : at + size]):
                    pieces.append(char)
                at += size
            kept.append("".join(pieces))
            d += 1
        out.append(kept)
    return out


def planted_corpus(seed: int, n_tasks: int = 3, docs_per_task: int = 4) -> list[list[str]]:
    rng = random.Random(seed)
    alphabet = "ab é\n"
    tasks = [
        ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(docs_per_task)]
        for _ in range(n_tasks)
    ]
    flat = [(t, i) for t in range(n_tasks) for i in range(docs_per_task)]
    for _ in range(6):  # copy a span of one document into another one (or into itself)
        (st, si), (dt, di) = rng.choice(flat), rng.choice(flat)
        source = tasks[st][si]
        if len(source) < 5:
            continue
        a = rng.randrange(len(source) - 4)
        span = source[a : a + rng.randint(4, 30)]
        target = tasks[dt][di]
        at = rng.randint(0, len(target))
        tasks[dt][di] = target[:at] + span + target[at:]
    return tasks


def test_suffix_array_matches_sorted_suffixes() -> None:
    rng = np.random.default_rng(0)
    for n, sigma in [(1, 2), (2, 1), (17, 2), (200, 3), (300, 50)]:
        values = rng.integers(0, sigma, n)
        expected = sorted(range(n), key=lambda i: values[i:].tolist())
        sa, ranks = suffix_array(values, keep_level=4)
        assert sa.tolist() == expected
        # to depth 4: ordered by the first 4 symbols, equal ones in position order
        shallow, _ = suffix_array(values, max_level=4)
        assert shallow.tolist() == sorted(range(n), key=lambda i: (values[i : i + 4].tolist(), i))
        prefixes = [tuple(values[i : i + 4].tolist()) for i in range(n)]
        # ranks at level 4 are equal exactly when the 4-symbol prefixes are
        assert (ranks[:, None] == ranks[None, :]).tolist() == [[p == q for q in prefixes] for p in prefixes]


def test_kgram_groups_and_separators() -> None:
    values, starts = concatenate_documents([b"abcab", b"cab", b"ab"])
    assert starts.tolist() == [0, 6, 10]
    got = kgram_groups(values, 2)
    groups: dict[int, set[int]] = {}
    for start, group in zip(*got):
        groups.setdefault(int(group), set()).add(int(start))
    # "ab" at 0, 3, 7, 10 and "ca" at 2, 6; nothing across the separators ("b|c" is no "bc")
    assert sorted(map(sorted, groups.values())) == [[0, 3, 7, 10], [2, 6]]
    assert repeated_starts(values, 3, "first").tolist() == [6]  # "cab" at 2, then at 6
    assert repeated_starts(values, 3, "none").tolist() == [2, 6]


def test_widen_to_characters_keeps_valid_utf8() -> None:
    data = np.frombuffer("aé€b".encode(), np.uint8)  # 1 + 2 + 3 + 1 bytes
    mask = np.zeros(len(data), bool)
    mask[2] = True  # the second byte of é
    mask[5] = True  # the last byte of €
    assert widen_to_characters(data, mask).tolist() == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("keep", ["first", "none"])
@pytest.mark.parametrize("k", [1, 3, 5, 8, 13, 21])
def test_step_matches_brute_force(tmp_path, k: int, keep: str) -> None:
    for seed in range(3):
        tasks = planted_corpus(seed * 31 + k)
        docs = [[Document(f"{t}-{i}", text) for i, text in enumerate(task)] for t, task in enumerate(tasks)]
        work = tmp_path / f"{seed}"
        work.mkdir()
        kept = run_two_passes(ExactSubstringDedup(min_bytes=k, keep=keep), docs, work)
        expected = brute_force(tasks, k, keep)
        got = {d.id: d.text for task in kept for d in task}
        for t, task in enumerate(expected):
            for i, text in enumerate(task):
                if text.strip() or text == tasks[t][i]:  # only a document that was cut can go
                    assert got[f"{t}-{i}"] == text, (seed, t, i)
                else:
                    assert f"{t}-{i}" not in got


@pytest.mark.parametrize("shard_bytes", [1, 40, 90, 250])
def test_sharded_equals_unsharded(tmp_path, shard_bytes: int) -> None:
    tasks = planted_corpus(7, n_tasks=4, docs_per_task=5)

    def docs() -> list[list[Document]]:  # fresh documents: pass 2 cuts them in place
        return [[Document(f"{t}-{i}", text) for i, text in enumerate(task)] for t, task in enumerate(tasks)]

    reference = ExactSubstringDedup(min_bytes=6)
    (tmp_path / "a").mkdir()
    expected = run_two_passes(reference, docs(), tmp_path / "a")
    assert expected != docs()  # something was cut
    step = ExactSubstringDedup(min_bytes=6, shard_bytes=shard_bytes)
    (tmp_path / "b").mkdir()
    assert run_two_passes(step, docs(), tmp_path / "b") == expected
    assert step.stats.counters == reference.stats.counters


def test_reduce_parts_equal_reduce(tmp_path) -> None:
    """The executor's sharded barrier: pairs of shards split over parts, then merged."""
    tasks = planted_corpus(3, n_tasks=3, docs_per_task=6)
    docs = [[Document(f"{t}-{i}", text) for i, text in enumerate(task)] for t, task in enumerate(tasks)]
    step = ExactSubstringDedup(min_bytes=5, shard_bytes=60)
    artifacts = []
    for t, task in enumerate(docs):
        artifacts.append(tmp_path / f"artifact-{t}")
        list(step.collect_stream(iter(task), t, artifacts[-1]))
    whole, merged = tmp_path / "whole", tmp_path / "merged"
    whole.mkdir(), merged.mkdir()
    step.reduce(artifacts, whole)
    parts = [tmp_path / f"part-{p}" for p in range(3)]
    for p, path in enumerate(parts):
        step.reduce_part(artifacts, p, 3, path)
    step.merge_parts(artifacts, parts, merged)
    for t in range(3):
        a, b = np.load(whole / f"task-{t:05d}.npz"), np.load(merged / f"task-{t:05d}.npz")
        assert all(np.array_equal(a[key], b[key]) for key in ("positions", "counts", "spans"))


def test_exclusion_output_and_counts(tmp_path) -> None:
    assert STEPS["exact_substring_dedup"] is ExactSubstringDedup
    shared = "The quick brown fox jumps over the lazy dog. "
    tasks = [
        [Document("a", "Alpha one:" + shared + "| end A")],
        [Document("b", "Beta two;" + shared + "# end B"), Document("c", shared)],
    ]
    step = ExactSubstringDedup(min_bytes=20)
    excluded: list[tuple[str, str, dict]] = []
    artifacts = []
    for t, task in enumerate(tasks):
        artifacts.append(tmp_path / f"artifact-{t}")
        list(step.collect_stream(iter(task), t, artifacts[-1]))
    (tmp_path / "decision").mkdir()
    step.reduce(artifacts, tmp_path / "decision")
    step.reset_stats()
    step.exclude = lambda doc, name, reason: excluded.append((doc.id, reason, doc.meta))
    kept = [list(step.apply_stream(iter(task), tmp_path / "decision", t)) for t, task in enumerate(tasks)]
    assert [d.text for d in kept[0]] == ["Alpha one:" + shared + "| end A"]  # the first copy stays
    assert [d.text for d in kept[1]] == ["Beta two;# end B"]
    assert [(i, r) for i, r, _ in excluded] == [("b", "duplicate_spans"), ("c", "only_duplicate_spans")]
    assert excluded[0][2]["removed_spans"] == [[9, 9 + len(shared)]]
    assert excluded[0][2]["removed_bytes"] == len(shared)
    assert step.stats.removed == {"only_duplicate_spans": 1}
    assert step.stats.counters["substring_bytes_removed"] == 2 * len(shared)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="keep"):
        ExactSubstringDedup(keep="last")
    with pytest.raises(ValueError, match="min_bytes"):
        ExactSubstringDedup(min_bytes=0)


@pytest.mark.multiprocess
def test_pipeline_run_sharded_on_two_workers_equals_one_suffix_array(tmp_path) -> None:
    """Through the executor: pairs of shards as reduce parts on 2 workers, exclusions written."""
    import gzip
    import json

    from lmforge.data.executor import LocalExecutor
    from lmforge.data.io import JsonlReader, Writer
    from lmforge.data.pipeline import Pipeline

    raw = tmp_path / "raw"
    raw.mkdir()
    for t, task in enumerate(planted_corpus(11, n_tasks=3, docs_per_task=8)):
        lines = [json.dumps({"id": f"{t}-{i}", "text": text}) for i, text in enumerate(task)]
        (raw / f"{t}.jsonl").write_text("\n".join(lines) + "\n")

    def run(name: str, workers: int, shard_bytes: int) -> tuple[list[str], list[dict]]:
        step = ExactSubstringDedup(min_bytes=8, shard_bytes=shard_bytes)
        pipeline = Pipeline(
            JsonlReader(f"{raw}/*.jsonl"),
            [step],
            Writer(str(tmp_path / name), "jsonl"),
            keep_intermediate=True,
        )
        LocalExecutor(workers).run(pipeline, tmp_path / f"run-{name}", progress=False)
        texts = [
            line for f in sorted((tmp_path / name).glob("*.jsonl")) for line in f.read_text().splitlines()
        ]
        excluded = [
            json.loads(line)
            for f in sorted((tmp_path / f"run-{name}" / "excluded").rglob("*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode().splitlines()
        ]
        return texts, excluded

    one = run("one", 1, 0)
    two = run("two", 2, 120)
    assert one == two
    texts, excluded = one
    assert len(texts) > 0
    assert excluded and all(r["meta"]["removed_bytes"] > 0 for r in excluded)
    assert {r["reason"] for r in excluded} <= {"duplicate_spans", "only_duplicate_spans"}
    parts = sorted(p.name for p in (tmp_path / "run-two" / "stages" / "0" / "reduce-parts").iterdir())
    assert parts == ["000-of-002", "001-of-002"]
