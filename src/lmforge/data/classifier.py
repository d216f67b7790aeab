"""Classifier-based quality filter: a linear model over hashed word n-grams (the fastText-style quality
classifiers of GPT-3, LLaMA and DCLM), trained with logistic loss and Adagrad in numpy.

Features: the words of a document (lowercased, punctuation as space) and its word n-grams up to
``ngrams`` are hashed into ``dim`` buckets with a sign bit (the hashing trick, Weinberger et al. 2009);
counts are log-scaled and the vector L2-normalized. The model is one ``.npz`` file: weights, bias and a
JSON header with the feature settings and training summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step
from lmforge.data.text import fmix64, word_hashes

FORMAT_VERSION = 1
_NGRAM_SALT = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class SparseRows:
    """Documents as CSR rows: ``indices[indptr[i]:indptr[i+1]]`` and ``values`` of document i."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: np.ndarray) -> SparseRows:
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        gather = np.concatenate(
            [np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows] or [np.empty(0, int)]
        )
        return SparseRows(
            np.concatenate(([0], np.cumsum(lengths))), self.indices[gather], self.values[gather]
        )

    def dot(self, weights: np.ndarray) -> np.ndarray:
        products = weights[self.indices] * self.values
        sums = np.add.reduceat(products, self.indptr[:-1]) if len(products) else np.zeros(len(self))
        return np.where(self.indptr[1:] > self.indptr[:-1], sums, 0.0)  # reduceat misreads empty rows


def featurize(texts: Sequence[str], dim: int, ngrams: int) -> SparseRows:
    """Hashed, signed, log-scaled, L2-normalized word 1..ngrams-gram counts of every text."""
    words, counts = word_hashes(texts)
    doc_starts = np.concatenate(([0], np.cumsum(counts)))
    doc_of_word = np.repeat(np.arange(len(texts)), counts)
    keys, owners = [words], [doc_of_word]
    combined = words.copy()
    for n in range(2, ngrams + 1):
        # n-gram ending at word i+n-1 = mix of the (n-1)-gram at i with word i+n-1, within one document.
        combined = fmix64(combined[:-1] * _NGRAM_SALT + words[n - 1 :])
        starts = np.arange(len(combined))
        inside = starts + n <= doc_starts[doc_of_word[: len(combined)] + 1]
        keys.append(combined[inside] ^ np.uint64(n))
        owners.append(doc_of_word[: len(combined)][inside])
    key = np.concatenate(keys)
    owner = np.concatenate(owners)
    bucket = (key % np.uint64(dim)).astype(np.int64)
    sign = np.where(key >> np.uint64(63), -1.0, 1.0)
    # Sum signed counts per (document, bucket).
    flat = owner * dim + bucket
    order = np.argsort(flat, kind="stable")
    flat, sign = flat[order], sign[order]
    unique, first = np.unique(flat, return_index=True)
    summed = np.add.reduceat(sign, first) if len(first) else np.empty(0)
    values = np.sign(summed) * np.log1p(np.abs(summed))
    rows = unique // dim
    norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=len(texts)))
    values = values / np.where(norms[rows] > 0, norms[rows], 1.0)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=len(texts)))))
    return SparseRows(indptr, (unique % dim).astype(np.int64), values)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass
class QualityClassifier:
    """A trained linear classifier; ``score`` gives P(positive | text)."""

    weights: np.ndarray
    bias: float
    dim: int
    ngrams: int
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        features = featurize(texts, self.dim, self.ngrams)
        return _sigmoid(features.dot(self.weights) + self.bias)

    def save(self, path: str | Path) -> None:
        header = {"format": "lmforge-quality-classifier", "version": FORMAT_VERSION, "dim": self.dim}
        header.update(ngrams=self.ngrams, bias=self.bias, info=self.info)
        with open(path, "wb") as handle:
            np.savez_compressed(
                handle,
                weights=self.weights.astype(np.float32),
                header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            )

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode("utf-8"))
            if (
                header.get("format") != "lmforge-quality-classifier"
                or header.get("version") != FORMAT_VERSION
            ):
                raise ValueError(f"{path} is not an lmforge quality classifier (version {FORMAT_VERSION})")
            weights = data["weights"].astype(np.float64)
        return cls(weights, float(header["bias"]), int(header["dim"]), int(header["ngrams"]), header["info"])


def train_classifier(
    positive: Sequence[str],
    negative: Sequence[str],
    dim: int = 1 << 18,
    ngrams: int = 2,
    epochs: int = 5,
    learning_rate: float = 0.5,
    l2: float = 1e-6,
    batch_size: int = 32,
    seed: int = 0,
) -> QualityClassifier:
    """Logistic regression with Adagrad on mini-batches; classes are re-weighted to count equally."""
    if not positive or not negative:
        raise ValueError("need at least one positive and one negative document")
    features = featurize(list(positive) + list(negative), dim, ngrams)
    labels = np.concatenate((np.ones(len(positive)), np.zeros(len(negative))))
    class_weight = np.where(labels == 1, len(labels) / (2 * len(positive)), len(labels) / (2 * len(negative)))
    weights = np.zeros(dim)
    bias = 0.0
    grad_sq = np.full(dim, 1e-8)
    bias_grad_sq = 1e-8
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(labels)), max(1, len(labels) // batch_size)):
            rows = features.take(batch)
            error = (_sigmoid(rows.dot(weights) + bias) - labels[batch]) * class_weight[batch] / len(batch)
            row_of_entry = np.repeat(np.arange(len(batch)), np.diff(rows.indptr))
            touched, inverse = np.unique(rows.indices, return_inverse=True)
            grad = np.bincount(inverse, weights=error[row_of_entry] * rows.values, minlength=len(touched))
            grad += l2 * weights[touched]
            grad_sq[touched] += grad**2
            weights[touched] -= learning_rate * grad / np.sqrt(grad_sq[touched])
            bias_grad = float(error.sum())
            bias_grad_sq += bias_grad**2
            bias -= learning_rate * bias_grad / np.sqrt(bias_grad_sq)
    info = {"positive_docs": len(positive), "negative_docs": len(negative), "epochs": epochs}
    info.update(learning_rate=learning_rate, l2=l2, batch_size=batch_size, seed=seed)
    return QualityClassifier(weights, bias, dim, ngrams, info)


def accuracy(model: QualityClassifier, positive: Sequence[str], negative: Sequence[str]) -> float:
    """Fraction of documents on the right side of 0.5."""
    if not positive and not negative:
        return float("nan")
    right = int(np.sum(model.score(positive) >= 0.5)) if positive else 0
    right += int(np.sum(model.score(negative) < 0.5)) if negative else 0
    return right / (len(positive) + len(negative))


def split_holdout(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out) after a seeded shuffle; at least one document stays in training."""
    order = np.random.default_rng(seed).permutation(len(texts))
    n_held = min(round(len(texts) * fraction), max(len(texts) - 1, 0))
    return [texts[i] for i in order[n_held:]], [texts[i] for i in order[:n_held]]


@register_step("quality_classifier")
class ClassifierFilter(Filter):
    """Scores documents with a trained classifier (``meta.quality_score``) and keeps those >= ``threshold``."""

    def __init__(self, model: str, threshold: float = 0.5, max_chars: int = 100_000) -> None:
        super().__init__()
        self.model = model
        self.threshold = threshold
        self.max_chars = max_chars
        self._classifier: QualityClassifier | None = None

    def decide(self, doc: Document) -> str | None:
        if self._classifier is None:  # loaded in the worker, on first use
            self._classifier = QualityClassifier.load(self.model)
        score = float(self._classifier.score([doc.text[: self.max_chars]])[0])
        doc.meta["quality_score"] = round(score, 6)
        return None if score >= self.threshold else "classifier_low_score"
