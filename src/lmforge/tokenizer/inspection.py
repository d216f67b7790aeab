"""How well a tokenizer fits some text: compression, byte-fallback share, round-trip fidelity.

``inspect_texts`` groups ``(group, text)`` pairs (e.g. by language or source) and reports, per group, bytes
per token, the share of tokens that stand for raw bytes rather than text (:func:`fallback_token_ids`),
and how many texts decode back to themselves. :func:`is_lossless` tells when the round trip holds for
every string by construction, so callers can skip checking it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmforge.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted (character -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _uses_byte_level(tok: Tokenizer) -> bool:
    decoder = json.loads(tok.backend.to_str()).get("decoder") or {}
    stack = [decoder]
    while stack:
        node = stack.pop()
        if node.get("type") == "ByteLevel":
            return True
        stack.extend(node.get("decoders", []))
    return False


def is_lossless(tok: Tokenizer) -> bool:
    """True when ``decode(encode(text)) == text`` holds for every string by construction: byte-level BPE
    whose vocabulary has all 256 byte symbols, with no normalizer and only regex splits before the
    byte mapping (special-token text aside, see ``backend.encode_special_tokens``)."""
    spec = json.loads(tok.backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if spec.get("normalizer") is not None or not steps or steps[-1].get("type") != "ByteLevel":
        return False
    if any(step.get("type") != "Split" for step in steps[:-1]):
        return False
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec["model"].get("type") != "BPE":
        return False
    vocab = spec["model"].get("vocab", {})
    return all(symbol in vocab for symbol in _byte_level_decoding())


def fallback_token_ids(tok: Tokenizer) -> set[int]:
    """Ids that stand for raw bytes rather than text: the unknown token, SentencePiece ``<0xNN>`` byte
    tokens, and byte-level tokens whose bytes are not a whole UTF-8 sequence (a character split in parts)."""
    ids: set[int] = set()
    if tok.unk_id is not None:
        ids.add(tok.unk_id)
    byte_level = _uses_byte_level(tok)
    table = _byte_level_decoding()
    special = tok.special_ids
    for token, token_id in tok.backend.get_vocab(with_added_tokens=False).items():
        if token_id in special:
            continue
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            ids.add(token_id)
        elif byte_level and all(c in table for c in token):
            try:
                bytes(table[c] for c in token).decode("utf-8")
            except UnicodeDecodeError:
                ids.add(token_id)
    return ids


@dataclass
class TextStats:
    """Compression and fidelity of a tokenizer on a group of texts (one language or source)."""

    docs: int = 0
    bytes: int = 0
    tokens: int = 0
    fallback_tokens: int = 0
    round_trips: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def fallback_share(self) -> float:
        return self.fallback_tokens / self.tokens if self.tokens else 0.0

    @property
    def round_trip_rate(self) -> float:
        return self.round_trips / self.docs if self.docs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "bytes_per_token": round(self.bytes_per_token, 4),
            "fallback_share": round(self.fallback_share, 6),
            "round_trip_rate": round(self.round_trip_rate, 6),
        }


def inspect_texts(
    tok: Tokenizer, groups: Iterable[tuple[str, str]], batch_size: int = 256
) -> dict[str, TextStats]:
    """Per-group statistics for ``(group, text)`` pairs, e.g. group = language or source."""
    fallback = fallback_token_ids(tok)
    stats: dict[str, TextStats] = {}
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        for (group, text), ids in zip(pending, tok.encode_batch([t for _, t in pending])):
            s = stats.setdefault(group, TextStats())
            s.docs += 1
            s.bytes += len(text.encode("utf-8"))
            s.tokens += len(ids)
            s.fallback_tokens += sum(1 for i in ids if i in fallback)
            s.round_trips += tok.decode(ids) == text
        pending.clear()

    for item in groups:
        pending.append(item)
        if len(pending) >= batch_size:
            flush()
    flush()
    return stats
