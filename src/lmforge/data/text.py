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


_FMIX_SHIFT = np.uint64(33)
_FMIX_MULTIPLIERS = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection (wrapping uint64 arithmetic).

    Computed in place in two buffers (half the passes over memory of the textbook expression).
    """
    x = np.asarray(x, dtype=np.uint64)
    mixed = x >> _FMIX_SHIFT
    mixed ^= x
    shifted = np.empty_like(mixed)
    for multiplier in _FMIX_MULTIPLIERS:
        mixed *= multiplier
        np.right_shift(mixed, _FMIX_SHIFT, out=shifted)
        mixed ^= shifted
    return mixed


# Punctuation and Unicode spaces become ASCII space, so that word boundaries are ASCII bytes.
_UNICODE_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b\u2028\u2029\u202f\u205f\u3000"
_SEPARATOR_CHARS = string.punctuation + "“”‘’‚„«»‹›—–‐…¿¡·。、，．！？：；（）「」『』【】" + _UNICODE_SPACES
_SEPARATORS = str.maketrans(dict.fromkeys(_SEPARATOR_CHARS, " "))
# The same folding for hashing in two cheap passes (str.translate is slow on any text with a non-ASCII
# character): a regular expression for the non-ASCII separators, then a byte table on the UTF-8 for the
# ASCII ones.
_NON_ASCII_SEPARATOR_RE = re.compile(
    "[" + re.escape("".join(sorted({c for c in _SEPARATOR_CHARS if not c.isascii()}))) + "]"
)
_ASCII_SEPARATOR_BYTES = "".join(c for c in _SEPARATOR_CHARS if c.isascii()).encode()
_ASCII_SEPARATORS_TO_SPACE = bytes.maketrans(_ASCII_SEPARATOR_BYTES, b" " * len(_ASCII_SEPARATOR_BYTES))
# ASCII whitespace (as str.split sees it) also becomes a space before the word boundaries are found, in
# the same table. Bytes >= 0x80 are never separators: they are parts of multi-byte UTF-8 characters.
# The table lowercases ASCII letters too: an ASCII document skips ``str.lower`` (see _lowered_utf8).
_SEPARATOR_BYTES = _ASCII_SEPARATOR_BYTES + b"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_ASCII_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_SEPARATORS_TO_SPACE = bytes.maketrans(
    _SEPARATOR_BYTES + _ASCII_UPPER, b" " * len(_SEPARATOR_BYTES) + _ASCII_UPPER.lower()
)
_BYTE_BASE = 0x100000001B3  # odd, so it is invertible modulo 2^64
_GROUP_BYTES = 1 << 17  # text hashed per vectorized pass: its uint64 temporaries stay in cache
_PIECE_BYTES = 1 << 20  # longer documents are cut (at whitespace when possible) into pieces this long
_POWERS: list[np.ndarray] = []  # [B^i, B^-i] modulo 2^64 for i <= _PIECE_BYTES


def fold_case_and_punctuation(text: str) -> str:
    """Lowercase, with punctuation and Unicode spaces turned into ASCII spaces (the word view of hashing)."""
    return text.lower().translate(_SEPARATORS)


def _lowered_utf8(text: str) -> bytes:
    """UTF-8 of the text, lowercased but for ASCII letters, with its non-ASCII separators turned into
    spaces: translated with ``_SEPARATORS_TO_SPACE``, it is ``fold_case_and_punctuation(text).encode("utf-8")``
    (up to the other ASCII whitespace that table also turns into spaces).

    An ASCII document is only encoded: ``str.lower`` costs more than the byte table that lowercases its
    letters, and for ASCII text the two agree.
    """
    if text.isascii():
        return text.encode("ascii")
    return _NON_ASCII_SEPARATOR_RE.sub(" ", text.lower()).encode("utf-8")


def _byte_powers() -> tuple[np.ndarray, np.ndarray]:
    if not _POWERS:
        one = np.ones(1, dtype=np.uint64)
        for base in (_BYTE_BASE, pow(_BYTE_BASE, -1, 1 << 64)):
            _POWERS.append(np.concatenate((one, np.cumprod(np.full(_PIECE_BYTES, base, dtype=np.uint64)))))
    return _POWERS[0], _POWERS[1]


def _pieces(encoded: bytes) -> list[bytes]:
    """``encoded`` cut into pieces of at most _PIECE_BYTES, at a space, newline or tab where there is one."""
    pieces, start = [], 0
    while len(encoded) - start > _PIECE_BYTES:
        end = start + _PIECE_BYTES
        cut = max(encoded.rfind(sep, start, end) for sep in (b" ", b"\n", b"\t"))
        cut = cut if cut > start else end  # a single "word" longer than a piece is split
        pieces.append(encoded[start:cut])
        start = cut
    pieces.append(encoded[start:])
    return pieces


def _hash_group(pieces: list[bytes], piece_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the words of the joined pieces, and the number of words in each piece.

    ``piece_starts`` are the pieces' offsets in ``b" ".join(pieces)``, with its length + 1 at the end.
    With prefix sums ``S`` of ``byte_i * B^i`` (mod 2^64), the word spanning ``[s, e)`` hashes to
    ``(S[e] - S[s]) * B^-s = sum c_j * B^j``: the same value wherever the word sits.
    """
    data = np.frombuffer(b" ".join(pieces).translate(_SEPARATORS_TO_SPACE), dtype=np.uint8)
    up, down = _byte_powers()
    # Word bytes between two non-word sentinels; word edges alternate start, end, start, end...
    in_word = np.zeros(len(data) + 2, dtype=bool)
    np.not_equal(data, ord(" "), out=in_word[1:-1])
    edges = np.flatnonzero(in_word[1:] != in_word[:-1])
    word_starts, word_ends = edges[0::2], edges[1::2]
    prefix = np.empty(len(data) + 1, dtype=np.uint64)
    prefix[0] = 0
    np.copyto(prefix[1:], data)  # widened first: a uint8 x uint64 multiply casts in a slower loop
    np.multiply(prefix[1:], up[: len(data)], out=prefix[1:])
    np.cumsum(prefix[1:], out=prefix[1:])
    sums = prefix[word_ends]
    sums -= prefix[word_starts]
    sums *= down[word_starts]
    return fmix64(sums), np.diff(np.searchsorted(word_starts, piece_starts))


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of many documents, and the number of words in each.

    Text is lowercased and punctuation becomes space; a word is a maximal run of other characters. A word
    ``c_0 c_1 ... c_k`` (UTF-8 bytes) hashes to ``sum c_j * B^j`` (mod 2^64, a polynomial string hash)
    avalanched by a bijective mixer: deterministic across processes (unlike ``hash()``) and computed for
    all words of a group of documents in a few vectorized passes over their bytes.
    """
    pieces = [_lowered_utf8(text) for text in texts]
    piece_doc: np.ndarray | None = None  # the document of each piece, when some document was cut
    if any(len(piece) > _PIECE_BYTES for piece in pieces):
        cut: list[bytes] = []
        owners: list[int] = []
        for doc, encoded in enumerate(pieces):
            if len(encoded) > _PIECE_BYTES:  # cut where punctuation, spaces, newlines or tabs are
                encoded_pieces = _pieces(encoded.translate(_ASCII_SEPARATORS_TO_SPACE))
            else:
                encoded_pieces = [encoded]
            cut.extend(encoded_pieces)
            owners.extend([doc] * len(encoded_pieces))
        pieces, piece_doc = cut, np.asarray(owners, dtype=np.int64)
    # Offsets of the pieces joined by one space; a group is a run of pieces of at most _GROUP_BYTES (or a
    # single piece, at most _PIECE_BYTES), found by bisection rather than piece by piece.
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)) + 1, out=offsets[1:])
    hashes: list[np.ndarray] = [np.empty(0, dtype=np.uint64)]
    piece_words: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    start = 0
    while start < len(pieces):
        end = int(np.searchsorted(offsets, offsets[start] + _GROUP_BYTES, side="right")) - 1
        end = max(end, start + 1)
        group_hashes, group_words = _hash_group(pieces[start:end], offsets[start : end + 1] - offsets[start])
        hashes.append(group_hashes)
        piece_words.append(group_words)
        start = end
    words = np.concatenate(piece_words)
    if piece_doc is None:
        counts = words
    else:
        counts = np.zeros(len(texts), dtype=np.int64)
        np.add.at(counts, piece_doc, words)
    return np.concatenate(hashes), counts
