"""Documents for the data-pipeline benchmarks: generated prose by default, or real JSONL(.gz) corpora.

The generator draws words from a Zipf-distributed vocabulary of pronounceable pseudo-words and builds
sentences and paragraphs, so documents have the word-frequency shape of natural text (frequent function
words, a long tail) without shipping any data.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

_ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "st",
    "tr",
    "pl",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st"]


def make_vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.integers(1, 4)
        words.add(
            "".join(
                _ONSETS[rng.integers(len(_ONSETS))]
                + _VOWELS[rng.integers(len(_VOWELS))]
                + _CODAS[rng.integers(len(_CODAS))]
                for _ in range(syllables)
            )
        )
    return sorted(words)


def generated_documents(n: int, seed: int = 0, min_words: int = 150, max_words: int = 600) -> list[str]:
    """n documents of min_words..max_words words in sentences (8-25 words) and paragraphs."""
    rng = np.random.default_rng(seed)
    vocab = np.array(make_vocabulary(20_000, rng))
    ranks = np.arange(1, len(vocab) + 1)
    probs = 1.0 / ranks**1.1
    probs /= probs.sum()
    docs = []
    for _ in range(n):
        n_words = int(rng.integers(min_words, max_words + 1))
        words = vocab[rng.choice(len(vocab), size=n_words, p=probs)]
        sentences, i = [], 0
        while i < n_words:
            length = int(rng.integers(8, 26))
            chunk = " ".join(words[i : i + length])
            sentences.append(chunk[:1].upper() + chunk[1:] + ".")
            i += length
        paragraphs = [" ".join(sentences[j : j + 5]) for j in range(0, len(sentences), 5)]
        docs.append("\n\n".join(paragraphs))
    return docs


def corpus_documents(path: str, n: int, min_words: int = 50) -> list[str]:
    """Up to n texts with at least min_words words from a JSONL(.gz) file or a folder of them."""
    root = Path(path)
    files = sorted(root.glob("*.jsonl*")) if root.is_dir() else [root]
    docs: list[str] = []
    for file in files:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt", encoding="utf-8") as handle:
            for line in handle:
                text = json.loads(line).get("text", "")
                if len(text.split()) >= min_words:
                    docs.append(text)
                    if len(docs) >= n:
                        return docs
    return docs


def load_documents(path: str | None, n: int, seed: int = 0) -> list[str]:
    return corpus_documents(path, n) if path else generated_documents(n, seed)
