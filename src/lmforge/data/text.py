"""Text helpers shared by the pipeline steps: word splitting, duplicate statistics, normalization.

The quality filters follow rules published against NLTK-style word tokenization, where punctuation is a
token of its own; :func:`split_words` reproduces that shape with one regular expression so the filters
need no tokenizer model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# A word is a run of word characters (with inner apostrophes: "don't"); any other non-space run is a
# punctuation/symbol token of its own, as in NLTK's word_tokenize.
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_WHITESPACE_RE = re.compile(r"\s+")

# Sentence-final marks across scripts (Latin, CJK, Arabic, Devanagari...), used by FineWeb and C4-style
# line rules.
TERMINAL_PUNCTUATION: tuple[str, ...] = (
    ".", "!", "?", "。", "！", "？", "؟", "۔", "।", "॥", "…", "‼", "⁇", "⁈", "⁉", "︒", "﹒", "．", "｡",
    "։", "፧", "፨", "᙮", "᠃", "᠉", "܂", "܁", "߹", "။", "၊", "᭚", "᭛", "꓿", "꘎", "꘏", "꛳", "꛷", "‽",
)  # fmt: skip


def split_words(text: str) -> list[str]:
    """Word and punctuation tokens of ``text`` (punctuation runs are separate tokens)."""
    return _WORD_RE.findall(text)


def is_symbol_token(token: str) -> bool:
    """True for punctuation/symbol tokens (no letter or digit)."""
    return not any(ch.isalnum() for ch in token)


def duplicate_stats(items: Iterable[str]) -> tuple[int, int]:
    """(number of items seen before, characters in those repeated items); the first occurrence is not counted."""
    seen: set[str] = set()
    repeated = 0
    repeated_chars = 0
    for item in items:
        if item in seen:
            repeated += 1
            repeated_chars += len(item)
        else:
            seen.add(item)
    return repeated, repeated_chars


# Everything that is neither a word character nor whitespace: ASCII and Unicode punctuation and symbols.
_PUNCT_RE = re.compile(r"[^\w\s]|_")


def normalize_for_hash(text: str) -> str:
    """Canonical form for exact de-duplication: NFKC, lowercase, punctuation stripped, whitespace collapsed.

    Unicode punctuation is stripped as well as ASCII, so documents that differ only in quote style or
    dashes collide.
    """
    text = _PUNCT_RE.sub("", unicodedata.normalize("NFKC", text).lower())
    return _WHITESPACE_RE.sub(" ", text).strip()
