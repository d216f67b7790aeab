"""Text helpers shared by the pipeline steps: word splitting, duplicate statistics, normalization.

The quality filters follow rules published against NLTK-style word tokenization, where punctuation is a
token of its own; :func:`split_words` reproduces that shape with one regular expression so the filters
need no tokenizer model.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

# A word is a run of word characters (with inner apostrophes: "don't"); any other non-space run is a
# punctuation/symbol token of its own, as in NLTK's word_tokenize.
_WORD = r"\w+(?:['’]\w+)*"
_WORD_RE = re.compile(_WORD)
_TOKEN_RE = re.compile(_WORD + r"|[^\w\s]+")
_WHITESPACE_RE = re.compile(r"\s+")

# Sentence-final marks across scripts (Latin, CJK, Arabic, Devanagari...), used by FineWeb and C4-style
# line rules.
TERMINAL_PUNCTUATION: tuple[str, ...] = (
    ".", "!", "?", "。", "！", "？", "؟", "۔", "।", "॥", "…", "‼", "⁇", "⁈", "⁉", "︒", "﹒", "．", "｡",
    "։", "፧", "፨", "᙮", "᠃", "᠉", "܂", "܁", "߹", "။", "၊", "᭚", "᭛", "꓿", "꘎", "꘏", "꛳", "꛷", "‽",
)  # fmt: skip


def split_words(text: str, symbols: bool = True) -> list[str]:
    """Word and punctuation tokens of ``text`` (punctuation runs are separate tokens); words only when
    ``symbols`` is False."""
    return (_TOKEN_RE if symbols else _WORD_RE).findall(text)


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


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection (wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


# Punctuation separates words like whitespace does (ASCII and the common Unicode marks and spaces).
_SEPARATORS = str.maketrans(
    dict.fromkeys(
        string.punctuation + "“”‘’‚„«»‹›—–‐…¿¡·。、，．！？：；（）「」『』【】\u00a0\u2009\u200b\u3000", " "
    )
)
_SPACE_BYTES = np.zeros(256, dtype=bool)
_SPACE_BYTES[list(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")] = True
_BYTE_BASE = np.uint64(0x100000001B3)
_POWERS = [np.ones(1, dtype=np.uint64)]  # B^i modulo 2^64, grown on demand to the longest word seen
_GROUP_BYTES = 1 << 17  # text hashed per vectorized pass: its uint64 temporaries stay in cache


def _byte_powers(length: int) -> np.ndarray:
    if len(_POWERS[0]) < length:
        size = max(length, 2 * len(_POWERS[0]))
        ones = np.ones(1, dtype=np.uint64)
        _POWERS[0] = np.concatenate((ones, np.cumprod(np.full(size - 1, _BYTE_BASE, dtype=np.uint64))))
    return _POWERS[0]


def _hash_words_of(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    in_word = ~_SPACE_BYTES[data]
    word_start = in_word.copy()
    word_start[1:] &= ~in_word[:-1]
    word_starts = np.flatnonzero(word_start)
    if len(word_starts) == 0:
        return np.empty(0, dtype=np.uint64), np.zeros(len(encoded), dtype=np.int64)
    position = np.arange(len(data), dtype=np.int32 if len(data) < 1 << 31 else np.int64)
    offset_in_word = position - np.maximum.accumulate(np.where(word_start, position, 0))
    # Separator bytes contribute 0, so each reduceat segment (word + following spaces) sums the word.
    terms = (data * in_word) * _byte_powers(int(offset_in_word.max()) + 1)[offset_in_word]
    hashes = fmix64(np.add.reduceat(terms, word_starts))
    doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    doc_of_word = np.searchsorted(doc_starts, word_starts, side="right") - 1
    return hashes, np.bincount(doc_of_word, minlength=len(encoded)).astype(np.int64)


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of many documents, and the number of words in each.

    Text is lowercased and punctuation becomes space; a word is a maximal run of other characters. A word
    ``c_0 c_1 ... c_k`` (UTF-8 bytes) hashes to ``sum c_j * B^j`` (mod 2^64, a polynomial string hash)
    avalanched by a bijective mixer: deterministic across processes (unlike ``hash()``) and computed for
    all words of a group of documents in a few vectorized passes over their bytes.
    """
    encoded = [t.lower().translate(_SEPARATORS).encode("utf-8") for t in texts]
    hashes: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    start, size = 0, 0
    for end, text in enumerate(encoded, 1):
        size += len(text) + 1
        if size >= _GROUP_BYTES or end == len(encoded):
            group_hashes, group_counts = _hash_words_of(encoded[start:end])
            hashes.append(group_hashes)
            counts.append(group_counts)
            start, size = end, 0
    if not hashes:
        return np.empty(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(counts)
