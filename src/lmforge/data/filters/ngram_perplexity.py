"""Perplexity filter with a small n-gram language model trained by the project (interpolated Kneser-Ney).

The model (Chen & Goodman 1998, interpolated Kneser-Ney with one absolute discount ``D`` per order):

    P(w | h)  = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * P'(w | h[1:])

where ``c`` are raw counts at the highest order and continuation counts ``N1+(. h w)`` (the number of
distinct words seen before ``h w``) at the lower orders; the unigram level interpolates with the uniform
distribution over the vocabulary plus ``<unk>``, so every token has a non-zero probability. A context
never seen falls back to the lower order entirely. Units are words (lowercased ``\\w+``) or characters.

A document's perplexity is ``exp(-mean log P)`` over its tokens and the end-of-document token, with
``order - 1`` start symbols as the first context (sentence boundaries are not modelled).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
UNITS = ("word", "char")
_WORD_RE = re.compile(r"\w+")
FORMAT = "lmforge-kneser-ney"


def tokenize(text: str, unit: str) -> list[str]:
    if unit == "word":
        return _WORD_RE.findall(text.lower())
    if unit == "char":
        return list(" ".join(text.split()))  # whitespace runs collapse to one space
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


class KneserNeyLM:
    """An interpolated Kneser-Ney n-gram model; build with :meth:`train`, persist with :meth:`save`."""

    def __init__(self, order: int, unit: str, discount: float, counts: Counter[tuple[str, ...]]) -> None:
        if order < 1 or not 0.0 < discount < 1.0:
            raise ValueError("order must be >= 1 and discount in (0, 1)")
        self.order, self.unit, self.discount = order, unit, discount
        self.counts = counts  # raw counts of the highest-order n-grams (with BOS padding and EOS)
        self.vocab = {g[-1] for g in counts} | {UNK}
        # Per order k (1..order): the count used for k-grams (raw at the top, continuation below), and
        # per context: its total and the number of distinct continuations.
        self.ngram_counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
        self.context_totals: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
        self.context_types: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
        self.ngram_counts[order] = counts
        for k in range(order - 1, 0, -1):
            preceding: defaultdict[tuple[str, ...], set[str]] = defaultdict(set)
            for gram in self.ngram_counts[k + 1]:
                preceding[gram[1:]].add(gram[0])
            self.ngram_counts[k] = Counter({g: len(s) for g, s in preceding.items()})
        for k in range(1, order + 1):
            for gram, c in self.ngram_counts[k].items():
                self.context_totals[k][gram[:-1]] += c
                self.context_types[k][gram[:-1]] += 1

    @classmethod
    def train(
        cls, texts: Iterable[str], order: int = 3, unit: str = "word", discount: float = 0.75
    ) -> KneserNeyLM:
        counts: Counter[tuple[str, ...]] = Counter()
        for text in texts:
            tokens = [BOS] * (order - 1) + tokenize(text, unit) + [EOS]
            for i in range(order - 1, len(tokens)):
                counts[tuple(tokens[i - order + 1 : i + 1])] += 1
        return cls(order, unit, discount, counts)

    def probability(self, word: str, context: Sequence[str]) -> float:
        """P(word | the last order-1 tokens of context)."""
        if word not in self.vocab:
            word = UNK
        context = tuple(context[len(context) - self.order + 1 :]) if self.order > 1 else ()
        return self._interpolated(word, context)

    def _interpolated(self, word: str, context: tuple[str, ...]) -> float:
        k = len(context) + 1
        if k == 1:
            lower = 1.0 / len(self.vocab)
        else:
            lower = self._interpolated(word, context[1:])
        total = self.context_totals[k].get(context, 0)
        if total == 0:
            return lower
        count = self.ngram_counts[k].get((*context, word), 0)
        d = self.discount
        return max(count - d, 0.0) / total + d * self.context_types[k][context] / total * lower

    def log_prob(self, text: str) -> tuple[float, int]:
        """(natural-log probability of the text's tokens and the end token, number of predictions)."""
        tokens = [BOS] * (self.order - 1) + tokenize(text, self.unit) + [EOS]
        total = 0.0
        for i in range(self.order - 1, len(tokens)):
            total += math.log(self.probability(tokens[i], tokens[max(0, i - self.order + 1) : i]))
        return total, len(tokens) - self.order + 1

    def perplexity(self, text: str) -> float:
        log_p, n = self.log_prob(text)
        return math.exp(-log_p / n)

    def save(self, path: str | Path) -> None:
        """One gzipped JSON file: settings and the top-order counts (lower orders are re-derived)."""
        grams = sorted(self.counts.items())
        data = {"format": FORMAT, "order": self.order, "unit": self.unit, "discount": self.discount}
        data["counts"] = [[list(g), c] for g, c in grams]
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> KneserNeyLM:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an lmforge Kneser-Ney model")
        counts = Counter({tuple(g): c for g, c in data["counts"]})
        return cls(data["order"], data["unit"], data["discount"], counts)


@register_step("perplexity")
class PerplexityFilter(Filter):
    """Scores documents with a trained n-gram model (``meta.perplexity``) and keeps those within
    ``[min_perplexity, max_perplexity]`` (either bound may be None)."""

    def __init__(
        self,
        model: str,
        min_perplexity: float | None = None,
        max_perplexity: float | None = 1000.0,
        max_chars: int = 50_000,
    ) -> None:
        super().__init__()
        self.model = model
        self.min_perplexity = min_perplexity
        self.max_perplexity = max_perplexity
        self.max_chars = max_chars
        self._lm: KneserNeyLM | None = None

    def decide(self, doc: Document) -> str | None:
        if self._lm is None:  # loaded in the worker, on first use
            self._lm = KneserNeyLM.load(self.model)
        perplexity = self._lm.perplexity(doc.text[: self.max_chars])
        doc.meta["perplexity"] = round(perplexity, 3)
        if self.min_perplexity is not None and perplexity < self.min_perplexity:
            return "perplexity_too_low"
        if self.max_perplexity is not None and perplexity > self.max_perplexity:
            return "perplexity_too_high"
        return None
