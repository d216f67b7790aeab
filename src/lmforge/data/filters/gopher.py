"""Gopher quality and repetition filters (Rae et al. 2021, "Scaling Language Models", appendix A, table A1).

Repetition counting follows the published rules as datatrove implements them: lines are runs of text
between newlines (blank lines are not lines), paragraphs are separated by blank lines, n-grams are over
NLTK-style tokens (punctuation separate), every character fraction is taken over the whole text, and
duplicated n-grams count their characters without separators, skipping past each repeat.

Quality rules count *words*, i.e. tokens with a letter or digit, for every rule (length bounds, mean
length, the ``#``/ellipsis ratio, the alphabetic share and the stop words, matched case-insensitively);
datatrove divides some ratios by all tokens, punctuation included, and matches stop words in lowercase
only, which makes ordinary punctuated prose fail more often than the paper's rules intend.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step
from lmforge.data.text import duplicate_stats, split_words

_HAS_LETTER_RE = re.compile(r"[^\W\d_]")
# A word (``split_words``: word characters with inner apostrophes) has no letter (no match of
# _HAS_LETTER_RE) exactly when every character is a digit, "_" or an apostrophe; words one per line.
_NO_LETTER_WORD_RE = re.compile(r"^[\d_'’]+$", re.MULTILINE)
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
        # Public attributes are the step's configuration (run fingerprint): keep them in a stable order.
        self.stop_words = tuple(sorted({w.lower() for w in stop_words}))
        self._stop_words = frozenset(self.stop_words)
        self.bullets = tuple(bullets)

    def decide(self, doc: Document) -> str | None:
        text = doc.text
        words = split_words(text.lower(), symbols=False)  # lowercase once, for the stop-word rule
        n_words = len(words)
        if n_words == 0:
            return "gopher_no_words"
        if self.min_doc_words is not None and n_words < self.min_doc_words:
            return "gopher_short_doc"
        if self.max_doc_words is not None and n_words > self.max_doc_words:
            return "gopher_long_doc"

        mean_word_length = sum(map(len, words)) / n_words
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
            # a word without a letter is all digits, underscores and inner apostrophes: one regex pass
            # over the words, one per line, instead of a search per word
            alpha_words = n_words - len(_NO_LETTER_WORD_RE.findall("\n".join(words)))
            if alpha_words / n_words < self.min_alpha_words_ratio:
                return "gopher_below_alpha_threshold"

        if self.min_stop_words is not None:
            stop_words = sum(map(self._stop_words.__contains__, words))
            if stop_words < self.min_stop_words:
                return "gopher_not_enough_stop_words"
        return None


class WordNgrams:
    """Exact word n-gram identities of one document, for the repetition rules.

    Each n-gram gets an integer id (``ranks(n)[i]`` identifies ``words[i:i+n]``; equal ids mean equal
    n-grams, without hash collisions), with the first position and the number of occurrences of each id.
    Word ids are the position of the word's first occurrence (counted with ``np.bincount``, no sort).
    Level n is built from level n-1: an n-gram whose (n-1)-gram prefix occurs once occurs once too, so
    only the positions whose prefix repeats are sorted (``np.unique`` over prefix id and next word id);
    every other position gets an id of its own. In prose, few 5- to 10-grams repeat, so the higher levels
    cost a fraction of a full sort each.
    """

    def __init__(self, words: Sequence[str]) -> None:
        vocab: dict[str, int] = {}
        n_words = len(words)
        # the id of a word is the position of its first occurrence (the counter advances on every word)
        self.ids = np.fromiter(map(vocab.setdefault, words, itertools.count()), dtype=np.int64, count=n_words)
        self.prefix_chars = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=n_words), out=self.prefix_chars[1:])
        self._prefix_list: list[int] | None = None
        self._vocab_size = max(n_words, 1)  # every id (word or n-gram) is below the number of words
        # per n: (ids of the n-grams, first position of each id, occurrences of each id); ids index the
        # two other arrays
        first = np.arange(n_words, dtype=np.int64)
        counts = np.bincount(self.ids, minlength=n_words)
        self._levels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {1: (self.ids, first, counts)}

    def _level(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for k in range(max(self._levels) + 1, n + 1):
            prefix_ids, _, prefix_counts = self._levels[k - 1]
            size = len(self.ids) - k + 1
            prefix_ids = prefix_ids[:size]
            repeated = prefix_counts[prefix_ids] > 1
            candidates = np.flatnonzero(repeated)
            pairs = prefix_ids[candidates] * self._vocab_size + self.ids[candidates + (k - 1)]
            _, first_c, inverse, counts_c = np.unique(
                pairs, return_index=True, return_inverse=True, return_counts=True
            )
            singles = np.flatnonzero(~repeated)
            ranks = np.empty(size, dtype=np.int64)
            ranks[candidates] = inverse.reshape(-1)
            ranks[singles] = np.arange(len(first_c), len(first_c) + len(singles))
            first = np.concatenate([candidates[first_c], singles])
            counts = np.concatenate([counts_c, np.ones(len(singles), dtype=counts_c.dtype)])
            self._levels[k] = (ranks, first, counts)
        return self._levels[n]

    def ranks(self, n: int) -> np.ndarray:
        return self._level(n)[0]

    def chars(self, start: int, n: int) -> int:
        """Characters of the words of the n-gram at ``start`` (without separators)."""
        return int(self.prefix_chars[start + n] - self.prefix_chars[start])

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram: len(" ".join(ngram)) * its count.

        Among equally frequent n-grams the one that occurs first wins (``Counter.most_common`` order).
        """
        if len(self.ids) < n:
            return 0
        _, first, counts = self._level(n)
        most = counts.max()
        start = int(first[counts == most].min())
        return (self.chars(start, n) + n - 1) * int(most)

    def duplicated_chars(self, n: int) -> int:
        """Characters in n-grams that occurred earlier in the text, each word counted at most once.

        A repeated n-gram is counted (its characters without separators) and the scan jumps past it, so
        overlapping repeats do not count the same words twice. The scan visits only the positions of
        n-grams that occur more than once: an n-gram occurring once is never found in the seen set, so
        remembering it changes nothing.
        """
        if len(self.ids) < n:
            return 0
        ranks_array, first, counts = self._level(n)
        positions = np.arange(len(ranks_array))
        if not np.any(first[ranks_array] < positions):
            return 0
        multiple = np.flatnonzero(counts[ranks_array] > 1)
        ranks = ranks_array[multiple].tolist()
        if self._prefix_list is None:
            self._prefix_list = self.prefix_chars.tolist()
        prefix = self._prefix_list
        seen: set[int] = set()
        i = repeated_chars = 0
        for position, rank in zip(multiple.tolist(), ranks):
            if position < i:  # jumped over by the last repeat
                continue
            if rank in seen:
                repeated_chars += prefix[position + n] - prefix[position]
                i = position + n
            else:
                seen.add(rank)
                i = position + 1
        return repeated_chars


_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")

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

        lines = _LINES_RE.split(text)  # runs of newlines: blank lines are not repeated "lines"
        repeated, repeated_chars = duplicate_stats(lines)
        if self.dup_line_frac is not None and repeated / len(lines) > self.dup_line_frac:
            return "gopher_dup_line_frac"
        if self.dup_line_char_frac is not None and repeated_chars / len(text) > self.dup_line_char_frac:
            return "gopher_dup_line_char_frac"

        ngrams = WordNgrams(split_words(text))
        for n, max_frac in sorted(self.top_ngrams.items()):
            if ngrams.top_chars(n) / len(text) > max_frac:
                return f"gopher_top_{n}_gram"
        for n, max_frac in sorted(self.dup_ngrams.items()):
            if ngrams.duplicated_chars(n) / len(text) > max_frac:
                return f"gopher_duplicated_{n}_grams"
        return None
