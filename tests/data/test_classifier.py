import numpy as np
import pytest

from lmforge.data.classifier import ClassifierFilter, QualityClassifier, featurize, train_classifier
from lmforge.data.document import Document
from lmforge.data.step import STEPS

PROSE = (
    "the council met to discuss the budget and the new library plans while residents asked questions about "
    "schools parks roads taxes history science music the committee report described careful research "
    "evidence results and conclusions for the coming year"
)
SPAM = (
    "click buy now cheap free winner casino bonus pills deal offer limited subscribe discount hot sale "
    "best price guaranteed amazing bargain unlock prize exclusive viral trending now click free"
)
SHARED = "and the now of to in a is"


def synthetic(rng: np.random.Generator, vocabulary: str, n: int) -> list[str]:
    """Documents mixing a class vocabulary (70%) with shared filler words (30%)."""
    vocab, shared = vocabulary.split(), SHARED.split()
    docs = []
    for _ in range(n):
        words = [vocab[i] for i in rng.integers(len(vocab), size=40)]
        filler = [shared[i] for i in rng.integers(len(shared), size=17)]
        mixed = words + filler
        rng.shuffle(mixed)
        docs.append(" ".join(mixed))
    return docs


def test_featurize_rows_are_normalized_and_deterministic():
    rows = featurize(["Hello world hello", "", "WORLD, hello!"], dim=1024, ngrams=2)
    norms = [np.linalg.norm(rows.values[rows.indptr[i] : rows.indptr[i + 1]]) for i in range(3)]
    assert norms == pytest.approx([1.0, 0.0, 1.0])
    assert rows.indptr[2] == rows.indptr[1]  # the empty document has no features
    again = featurize(["Hello world hello"], dim=1024, ngrams=2)
    np.testing.assert_array_equal(again.indices, rows.indices[: rows.indptr[1]])
    # "hello world" and "world hello" are different bigrams: documents 0 and 2 differ.
    assert set(rows.indices[: rows.indptr[1]]) != set(rows.indices[rows.indptr[2] :])


def test_separates_two_distributions_on_held_out_data(tmp_path):
    rng = np.random.default_rng(0)
    good, bad = synthetic(rng, PROSE, 300), synthetic(rng, SPAM, 300)
    model = train_classifier(good[:200], bad[:200], dim=1 << 14, epochs=3)
    scores_good, scores_bad = model.score(good[200:]), model.score(bad[200:])
    accuracy = (np.sum(scores_good >= 0.5) + np.sum(scores_bad < 0.5)) / 200
    assert accuracy >= 0.97
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = QualityClassifier.load(path)
    np.testing.assert_allclose(loaded.score(good[200:210]), scores_good[:10], atol=1e-6)
    assert loaded.info["positive_docs"] == 200 and (loaded.dim, loaded.ngrams) == (1 << 14, 2)


def test_filter_step_scores_and_thresholds(tmp_path):
    rng = np.random.default_rng(1)
    model = train_classifier(synthetic(rng, PROSE, 100), synthetic(rng, SPAM, 100), dim=1 << 12, epochs=3)
    path = tmp_path / "model.npz"
    model.save(path)
    step = ClassifierFilter(model=str(path), threshold=0.5)
    assert STEPS["quality_classifier"] is ClassifierFilter
    good, bad = Document("g", synthetic(rng, PROSE, 1)[0]), Document("b", synthetic(rng, SPAM, 1)[0])
    assert step.decide(good) is None and good.meta["quality_score"] > 0.5
    assert step.decide(bad) == "classifier_low_score" and bad.meta["quality_score"] < 0.5


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, header=np.frombuffer(b'{"format": "x"}', dtype=np.uint8), weights=np.zeros(2))
    with pytest.raises(ValueError, match="not an lmforge quality classifier"):
        QualityClassifier.load(path)


def test_train_classifier_command(tmp_path, capsys):
    import json

    from lmforge.cli import main

    rng = np.random.default_rng(2)
    for name, vocabulary in (("pos", PROSE), ("neg", SPAM)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for i, text in enumerate(synthetic(rng, vocabulary, 60)):
                handle.write(json.dumps({"id": f"{name}{i}", "text": text}) + "\n")
            handle.write("{not json\n")
    out = tmp_path / "model.npz"
    args = ["data", "train-classifier", "--positive", str(tmp_path / "pos.jsonl"), "--negative"]
    args += [str(tmp_path / "neg.jsonl"), "--out", str(out), "--hash-bits", "12", "--holdout", "0.2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 unreadable records skipped" in printed and "held-out accuracy" in printed
    model = QualityClassifier.load(out)
    assert model.dim == 1 << 12 and model.info["holdout_accuracy"] >= 0.95
    assert model.info["positive_docs"] == 48  # 60 minus 12 held out
