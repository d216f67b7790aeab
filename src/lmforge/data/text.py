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
_BYTE_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2^64
_POWERS: dict[str, np.ndarray] = {}


def _byte_powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """B^i and B^-i modulo 2^64 for i < length (cached, grown by doubling)."""
    if len(_POWERS.get("up", ())) < length:
        size = max(length, 2 * len(_POWERS.get("up", ())), 1 << 16)
        one = np.ones(1, dtype=np.uint64)
        inverse = pow(_BYTE_BASE, -1, 1 << 64)
        _POWERS["up"] = np.concatenate((one, np.cumprod(np.full(size - 1, _BYTE_BASE, dtype=np.uint64))))
        _POWERS["down"] = np.concatenate((one, np.cumprod(np.full(size - 1, inverse, dtype=np.uint64))))
    return _POWERS["up"], _POWERS["down"]


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of many documents, and the number of words in each.

    Text is lowercased and punctuation becomes space; a word is a maximal run of other characters. All
    documents are hashed in one vectorized pass over their UTF-8 bytes: with prefix sums of
    ``byte_i * B^i`` (mod 2^64), a word spanning ``[s, e)`` hashes to ``(S[e] - S[s]) * B^-s``, a
    polynomial string hash independent of where the word sits, then avalanched by a bijective mixer.
    """
    encoded = [t.lower().translate(_SEPARATORS).encode("utf-8") for t in texts]
    data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    in_word = np.concatenate(([False], ~_SPACE_BYTES[data], [False]))
    edges = np.diff(in_word.view(np.int8))
    word_starts = np.flatnonzero(edges == 1)
    word_ends = np.flatnonzero(edges == -1)
    up, down = _byte_powers(len(data))
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data * up[: len(data)], out=prefix[1:])
    hashes = fmix64((prefix[word_ends] - prefix[word_starts]) * down[word_starts])
    doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    doc_of_word = np.searchsorted(doc_starts, word_starts, side="right") - 1
    return hashes, np.bincount(doc_of_word, minlength=len(texts)).astype(np.int64)
