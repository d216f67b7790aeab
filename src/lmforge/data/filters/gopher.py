"""Gopher quality and repetition filters (Rae et al. 2021, "Scaling Language Models", appendix A, table A1).

Counting follows the published rules as datatrove implements them: words are NLTK-style tokens
(punctuation separate), symbol tokens do not count as words for the length rules, and every character
fraction is taken over the length of the whole text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step
from lmforge.data.text import duplicate_stats, is_symbol_token, split_words

GOPHER_STOP_WORDS: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")


@register_step("gopher_quality")
class GopherQualityFilter(Filter):
    """Document-level quality heuristics; a threshold set to ``None`` disables its rule."""

    def __init__(
        self,
        min_doc_words: int | None = 50,
        max_doc_words: int | None = 100_000,
        min_avg_word_length: float | None = 3,
        max_avg_word_length: float | None = 10,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        min_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words: Sequence[str] = GOPHER_STOP_WORDS,
        bullets: Sequence[str] = ("•", "-"),
    ) -> None:
        super().__init__()
        self.min_doc_words = min_doc_words
        self.max_doc_words = max_doc_words
        self.min_avg_word_length = min_avg_word_length
        self.max_avg_word_length = max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(w.lower() for w in stop_words)
        self.bullets = tuple(bullets)

    def decide(self, doc: Document) -> str | None:
        text = doc.text
        tokens = split_words(text)
        words = [t for t in tokens if not is_symbol_token(t)]
        n_words = len(words)
        if n_words == 0:
            return "gopher_no_words"
        if self.min_doc_words is not None and n_words < self.min_doc_words:
            return "gopher_short_doc"
        if self.max_doc_words is not None and n_words > self.max_doc_words:
            return "gopher_long_doc"

        mean_word_length = sum(len(w) for w in words) / n_words
        if self.min_avg_word_length is not None and mean_word_length < self.min_avg_word_length:
            return "gopher_below_avg_word_length"
        if self.max_avg_word_length is not None and mean_word_length > self.max_avg_word_length:
            return "gopher_above_avg_word_length"

        if self.max_symbol_word_ratio is not None:
            if text.count("#") / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"

        lines = text.splitlines() or [text]
        if self.max_bullet_lines_ratio is not None:
            bullet_lines = sum(line.lstrip().startswith(self.bullets) for line in lines)
            if bullet_lines / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio is not None:
            ellipsis_lines = sum(line.rstrip().endswith(("...", "…")) for line in lines)
            if ellipsis_lines / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"

        if self.min_alpha_words_ratio is not None:
            alpha_words = sum(any(ch.isalpha() for ch in w) for w in words)
            if alpha_words / n_words < self.min_alpha_words_ratio:
                return "gopher_below_alpha_threshold"

        if self.min_stop_words is not None:
            stop_words = sum(w.lower() in self.stop_words for w in words)
            if stop_words < self.min_stop_words:
                return "gopher_not_enough_stop_words"
        return None


def top_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram: len(" ".join(ngram)) * its count."""
    counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0
    ngram, count = counts.most_common(1)[0]
    return len(ngram) * count


def duplicated_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters in n-grams that occurred earlier in the text, each word counted at most once.

    A repeated n-gram is counted (its characters without separators) and the scan jumps past it, so
    overlapping repeats do not count the same words twice.
    """
    seen: set[tuple[str, ...]] = set()
    repeated_chars = 0
    i = 0
    while i <= len(words) - n:
        ngram = tuple(words[i : i + n])
        if ngram in seen:
            repeated_chars += sum(len(w) for w in ngram)
            i += n
        else:
            seen.add(ngram)
            i += 1
    return repeated_chars


_PARAGRAPH_RE = re.compile(r"\n{2,}")

DEFAULT_TOP_NGRAMS: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
DEFAULT_DUP_NGRAMS: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@register_step("gopher_repetition")
class GopherRepetitionFilter(Filter):
    """Removes documents dominated by repeated lines, paragraphs or n-grams."""

    def __init__(
        self,
        dup_line_frac: float | None = 0.3,
        dup_para_frac: float | None = 0.3,
        dup_line_char_frac: float | None = 0.2,
        dup_para_char_frac: float | None = 0.2,
        top_ngrams: dict[int, float] | None = None,
        dup_ngrams: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        # YAML keys arrive as strings; n-gram sizes are ints.
        self.top_ngrams = {
            int(n): float(f) for n, f in (DEFAULT_TOP_NGRAMS if top_ngrams is None else top_ngrams).items()
        }
        self.dup_ngrams = {
            int(n): float(f) for n, f in (DEFAULT_DUP_NGRAMS if dup_ngrams is None else dup_ngrams).items()
        }

    def decide(self, doc: Document) -> str | None:
        text = doc.text
        if not text:
            return "gopher_empty"
        paragraphs = _PARAGRAPH_RE.split(text.strip())
        repeated, repeated_chars = duplicate_stats(paragraphs)
        if self.dup_para_frac is not None and repeated / len(paragraphs) > self.dup_para_frac:
            return "gopher_dup_para_frac"
        if self.dup_para_char_frac is not None and repeated_chars / len(text) > self.dup_para_char_frac:
            return "gopher_dup_para_char_frac"

        lines = text.splitlines() or [text]
        repeated, repeated_chars = duplicate_stats(lines)
        if self.dup_line_frac is not None and repeated / len(lines) > self.dup_line_frac:
            return "gopher_dup_line_frac"
        if self.dup_line_char_frac is not None and repeated_chars / len(text) > self.dup_line_char_frac:
            return "gopher_dup_line_char_frac"

        words = split_words(text)
        for n, max_frac in sorted(self.top_ngrams.items()):
            if top_ngram_chars(words, n) / len(text) > max_frac:
                return f"gopher_top_{n}_gram"
        for n, max_frac in sorted(self.dup_ngrams.items()):
            if duplicated_ngram_chars(words, n) / len(text) > max_frac:
                return f"gopher_duplicated_{n}_grams"
        return None
