"""Sub-document de-duplication: boilerplate lines shared by many documents, and spans repeated in one.

- :class:`BoilerplateLineDedup` (dataset level): a line (normalized: case, punctuation and spacing
  ignored) that occurs in at least ``min_docs`` different documents is navigation, footer or legal
  boilerplate; it is removed from every document (as CCNet does with its paragraph hashes).
- :class:`RepeatedSpanRemover` (per document): a run of ``ngram`` or more words that already occurred
  earlier in the same document is cut out, keeping the first occurrence.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from lmforge.data.document import Document
from lmforge.data.step import GlobalStep, Step, register_step
from lmforge.data.text import fold_case_and_punctuation, normalize_for_hash


def line_hash(line: str) -> int:
    """64-bit hash of a normalized line, or 0 for a line with no words (never counted)."""
    canonical = normalize_for_hash(line)
    if not canonical:
        return 0
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little") | 1


@register_step("boilerplate_lines")
class BoilerplateLineDedup(GlobalStep):
    """Removes lines that occur in ``min_docs`` or more documents of the dataset.

    Lines shorter than ``min_line_chars`` (after stripping) are never counted nor removed. A document
    left with no text is removed with reason ``"only_boilerplate"``.
    """

    def __init__(self, min_docs: int = 10, min_line_chars: int = 10) -> None:
        super().__init__()
        if min_docs < 2:
            raise ValueError("min_docs must be at least 2")
        self.min_docs = min_docs
        self.min_line_chars = min_line_chars
        self._hashes: list[np.ndarray] = []
        self._boilerplate: frozenset[int] = frozenset()

    def _line_hashes(self, text: str) -> list[int]:
        return [
            line_hash(line) if len(line.strip()) >= self.min_line_chars else 0 for line in text.splitlines()
        ]

    def start_collect(self, task: int) -> None:
        self._hashes = []

    def collect(self, doc: Document, position: int) -> None:
        unique = {h for h in self._line_hashes(doc.text) if h}  # a line counts once per document
        self._hashes.append(np.fromiter(unique, dtype=np.uint64, count=len(unique)))

    def write_artifact(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.concatenate(self._hashes or [np.empty(0, np.uint64)]))
        self._hashes = []

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        hashes = np.concatenate([np.load(p) for p in artifacts] or [np.empty(0, np.uint64)])
        values, counts = np.unique(hashes, return_counts=True)
        np.save(Path(decision_dir) / "boilerplate.npy", values[counts >= self.min_docs])

    def load_decision(self, decision_dir: Path, task: int) -> None:
        self._boilerplate = frozenset(np.load(Path(decision_dir) / "boilerplate.npy").tolist())

    def process(self, doc: Document) -> Document | None:
        lines = doc.text.splitlines()
        kept = [
            line for line, h in zip(lines, self._line_hashes(doc.text)) if not h or h not in self._boilerplate
        ]
        removed = len(lines) - len(kept)
        if removed:
            self.stats.counters["boilerplate_lines_removed"] += removed
            self.stats.counters["boilerplate_docs_changed"] += 1
        text = "\n".join(kept).strip()
        if not text:
            self.remove(doc, "only_boilerplate")
            return None
        if removed:
            doc.text = text
        return doc


_WORD_SPAN_RE = re.compile(r"\S+")


def repeated_span_mask(words: list[str], ngram: int) -> list[bool]:
    """True for words inside an n-gram that already occurred earlier (without overlapping it).

    Windows are compared case- and punctuation-insensitively; a repeat extends as long as the following
    windows are repeats too, so a repeated paragraph is removed whole, not only its first n words.
    """
    keys = [fold_case_and_punctuation(w) for w in words]
    first_seen: dict[tuple[str, ...], int] = {}
    removed = [False] * len(words)
    for i in range(len(words) - ngram + 1):
        window = tuple(keys[i : i + ngram])
        first = first_seen.setdefault(window, i)
        if first + ngram <= i:  # an earlier, non-overlapping occurrence
            for k in range(i, i + ngram):
                removed[k] = True
    return removed


@register_step("repeated_spans")
class RepeatedSpanRemover(Step):
    """Cuts spans of ``ngram`` or more words that repeat an earlier part of the same document.

    The default of 20 words targets repeated paragraphs and doubled page furniture; shorter repeats are
    often real text (refrains, formulae of legal or religious texts).
    """

    def __init__(self, ngram: int = 20) -> None:
        super().__init__()
        if ngram < 1:
            raise ValueError("ngram must be positive")
        self.ngram = ngram

    def process(self, doc: Document) -> Document | None:
        matches = list(_WORD_SPAN_RE.finditer(doc.text))
        removed = repeated_span_mask([m.group() for m in matches], self.ngram)
        if not any(removed):
            return doc
        # Rebuild from the kept words, each preceded by the whitespace that preceded it in the original.
        pieces: list[str] = []
        previous_end = 0
        spans = 0
        for k, (match, drop) in enumerate(zip(matches, removed)):
            if drop:
                spans += k == 0 or not removed[k - 1]
            else:
                if pieces:
                    pieces.append(doc.text[previous_end : match.start()])
                pieces.append(match.group())
            previous_end = match.end()
        self.stats.counters["repeated_spans_removed"] += spans
        self.stats.counters["repeated_span_words_removed"] += sum(removed)
        doc.text = "".join(pieces)  # never empty: the first occurrence of every span is kept
        return doc
