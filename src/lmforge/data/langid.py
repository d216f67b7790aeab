"""Language identification with py3langid's model (the langid.py model, shipped inside the package: 97
languages), scored by a vectorised reimplementation of its classifier.

py3langid walks a byte automaton (``tk_nextmove``/``tk_output``, an Aho-Corasick machine over byte n-grams)
in a Python loop, one step per byte, which costs ~0.15 us per byte. The machine's state after a byte is
the longest suffix of the input that is a node of its n-gram trie, so it depends only on the last
``depth`` bytes (the trie's depth, 6 for the shipped model). :class:`FastLanguageIdentifier` therefore
computes every position's state at once with ``depth`` numpy gathers, each window of bytes walked from
the start state (clipped at the start of the text), and scores the same feature counts with the same
numpy expression as py3langid, in the same feature order (first occurrence), so the language and the
probability are bit-for-bit py3langid's (``tests/data/test_langid.py`` checks it on many texts).
"""

from __future__ import annotations

import math
import threading
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step


@lru_cache(maxsize=1)
def _identifier() -> Any:
    """py3langid's own model with normalized probabilities, loaded once per process (the reference)."""
    from py3langid import langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


def _trie_depth(nextmove: np.ndarray, rowbase: np.ndarray) -> int:
    """Longest shortest path from the start state: the depth of the automaton's n-gram trie (a trie node
    of depth d is reached from the start by its own d bytes and by no shorter input). Breadth-first, each
    transition row (shared by many states) expanded once."""
    seen = np.zeros(len(rowbase), dtype=bool)
    expanded = np.zeros(len(nextmove) >> 8, dtype=bool)
    seen[0] = True
    frontier, depth = np.array([0]), 0
    while True:
        rows = np.unique(rowbase[frontier] >> 8)
        rows = rows[~expanded[rows]]
        expanded[rows] = True
        reached = np.zeros(len(rowbase), dtype=bool)
        reached[nextmove[(rows[:, None] << 8) + np.arange(256)]] = True
        frontier = np.flatnonzero(reached & ~seen)
        if len(frontier) == 0:
            return depth
        seen[frontier] = True
        depth += 1


class FastLanguageIdentifier:
    """py3langid's ``LanguageIdentifier(norm_probs=True).classify``, with the byte automaton run by numpy.

    Tables built once from py3langid's model: ``_next_row[j]`` is the row offset (``tk_row << 8``) of the
    state ``tk_nextmove[j]`` leads to, ``_next_feature[j]`` that state's feature (``tk_output``, -1 for
    none), ``_start2[a * 256 + b]`` the row offset after the bytes ``a, b`` from the start state, so one
    step of the walk is one gather; ``_ptc`` is ``nb_ptc`` in float32 (py3langid converts the rows it
    uses from float16 at every call: the same values, which was most of its scoring time).
    """

    def __init__(self, reference: Any) -> None:
        self.classes: list[str] = list(reference.nb_classes)
        self._ptc = np.asarray(reference.nb_ptc, dtype=np.float32)
        self._pc = np.asarray(reference.nb_pc)
        self._alias_pairs: list[tuple[int, int]] = list(reference._alias_pairs)
        nextmove = np.asarray(reference.tk_nextmove)  # py3langid's array (buffer protocol), not copied
        rowbase = np.asarray(reference.tk_row, dtype=np.int64) << 8
        output = np.asarray(reference.tk_output, dtype=np.int64)
        self.depth = _trie_depth(nextmove, rowbase)
        if self.depth < 2:
            raise ValueError(f"py3langid model with n-gram trie depth {self.depth}: expected at least 2")
        self._nextmove, self._rowbase, self._output = nextmove, rowbase, output  # for the first bytes
        self._next_row = rowbase[nextmove].astype(np.int32)
        self._next_feature = output[nextmove].astype(np.int32)
        after_one = self._next_row[rowbase[0] + np.arange(256)]
        self._start2 = self._next_row[(after_one[:, None] + np.arange(256)).reshape(-1)]
        self._scratch = threading.local()  # per thread: feature -> first position (then rank) array

    @staticmethod
    def encode(text: str) -> bytes:
        """py3langid's input preparation: all-uppercase text lowered, NFC, UTF-8 (lone surrogates kept)."""
        if text.isupper():
            text = text.lower()
        return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")

    def _walk(self, data: bytes) -> np.ndarray:
        """The feature (or -1) of the automaton's state after each byte of ``data``."""
        letters = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        n, depth = len(letters), self.depth
        head = []  # the first depth - 1 bytes: their windows are clipped at the start, walked one by one
        state = 0
        for letter in data[: depth - 1]:
            state = int(self._nextmove[self._rowbase[state] + letter])
            head.append(int(self._output[state]))
        if n < depth:
            return np.array(head, dtype=np.int32)
        # every later position: the walk from the start over its own window letters[i-depth+1 : i+1]
        rows = self._start2[(letters[: n - depth + 1] << 8) + letters[1 : n - depth + 2]]
        for k in range(2, depth - 1):
            rows = self._next_row[rows + letters[k : n - depth + 1 + k]]
        tail = self._next_feature[rows + letters[depth - 1 :]]
        return np.concatenate([np.array(head, dtype=np.int32), tail])

    def features(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids in order of first occurrence, their counts) of the automaton's walk over ``data``:
        py3langid's ``visit_counts`` Counter, as arrays."""
        found = self._walk(data)
        found = found[found >= 0].astype(np.int64)
        if len(found) == 0:
            return found, found
        positions = np.arange(len(found))
        first = getattr(self._scratch, "first", None)
        if first is None:  # entries are only read after this call wrote them: never cleared
            first = self._scratch.first = np.zeros(len(self._ptc), dtype=np.int64)
        first[found[::-1]] = positions[::-1]  # numpy writes repeated indices in order: the first one stays
        if np.any(first[found] > positions):  # not guaranteed by numpy's documentation: then the slow way
            first[found] = len(found)
            np.minimum.at(first, found, positions)
        new = first[found] == positions
        ids = found[new]
        first[ids] = np.arange(len(ids))  # now: feature -> its rank among the distinct features
        counts = np.bincount(first[found], minlength=len(ids))
        return ids, counts

    def scores(self, text: str) -> np.ndarray:
        """Probability per class (py3langid's ``_decide`` with ``norm_probs=True``)."""
        data = self.encode(text)
        ids, counts = self.features(data)
        if len(ids):
            scores = np.log1p(counts.astype(np.float32)) @ self._ptc[ids] + self._pc
        else:
            scores = np.full(len(self.classes), 0.0, dtype=np.float32)
        scores *= 1.0 / math.sqrt(len(data) or 1)
        np.exp(scores - scores.max(), out=scores)
        scores /= scores.sum()
        for i, j in self._alias_pairs:
            scores[i] += scores[j]
            scores[j] = 0.0
        return scores

    def classify(self, text: str) -> tuple[str, float]:
        """(language, probability) of the most likely language, as py3langid's ``classify``."""
        scores = self.scores(text)
        i = int(scores.argmax())
        return self.classes[i], float(scores[i])


@lru_cache(maxsize=1)
def _fast_identifier() -> FastLanguageIdentifier:
    return FastLanguageIdentifier(_identifier())


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language; equal to py3langid's ``classify``."""
    return _fast_identifier().classify(text)


@register_step("language")
class LanguageFilter(Filter):
    """Records ``meta.language``/``meta.language_score`` and keeps documents in ``languages`` (all when
    None) whose score reaches ``min_score``. Only the first ``max_chars`` characters are classified."""

    def __init__(
        self,
        languages: Sequence[str] | None = ("en",),
        min_score: float = 0.65,
        max_chars: int = 20_000,
    ) -> None:
        super().__init__()
        self.languages = tuple(sorted(set(languages))) if languages is not None else None
        self.min_score = min_score
        self.max_chars = max_chars

    def decide(self, doc: Document) -> str | None:
        language, score = identify_language(doc.text[: self.max_chars])
        doc.meta["language"] = language
        doc.meta["language_score"] = round(score, 4)
        self.stats.counters[f"language_{language}"] += 1
        if self.languages is not None and language not in self.languages:
            return "language_not_kept"
        if score < self.min_score:
            return "language_low_score"
        return None
