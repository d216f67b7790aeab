"""Token shards on disk: flat ``.bin`` token arrays, a document index, and ``manifest.json``.

A shards folder holds, for each shard ``NAME``:

- ``NAME.bin``: the token ids of its documents back to back, each document followed by the EOS id, as a
  flat little-endian ``uint16`` array when the vocabulary fits in 16 bits, else ``uint32``;
- ``NAME.idx.npy``: ``int64`` document offsets into ``NAME.bin`` (``n_docs + 1`` values, first 0, last the
  token count), so document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (its EOS included);
- ``NAME.json``: the shard's statistics as its writer counted them, written last (``manifest.json`` adds the
  records that the reader turned away before they reached the writer).

``manifest.json`` lists the shards with their domain and counts, the dtype, the vocabulary size, the EOS id
and the sha256 of the ``tokenizer.json`` that produced the ids. Readers refuse a manifest whose tokenizer
hash differs from the tokenizer in use, so ids are never read with the wrong vocabulary.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.atomic import atomic_write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "lmforge-shards/1"
DTYPES = ("auto", "uint16", "uint32")


class ShardsError(ValueError):
    """A shards folder that cannot be used as asked (missing, inconsistent, or for another tokenizer)."""


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit uint16 that cannot hold the
    vocabulary is an error rather than silently wrapped ids."""
    if requested not in DTYPES:
        raise ShardsError(f"dtype: {requested!r} is not one of {', '.join(DTYPES)}")
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "uint16" and not fits16:
        raise ShardsError(
            f"dtype uint16 cannot hold token ids of a {vocab_size}-token vocabulary (max 65536); use uint32 or auto"
        )
    if requested == "auto":
        return np.dtype(np.uint16 if fits16 else np.uint32)
    return np.dtype(requested)


@dataclass
class ShardStats:
    """What went into one shard (or, summed, into a domain or the whole folder)."""

    docs: int = 0
    tokens: int = 0  # EOS separators included
    empty_docs: int = 0  # skipped: no text, or no tokens
    non_round_trip_docs: int = 0  # kept, but decode(encode(text)) != text (normalization, unknown tokens)
    bad_records: int = 0  # unreadable records (no text field, not a string, ...), skipped
    special_text_docs: int = 0  # documents containing a special token's text (e.g. "<|end_of_text|>")
    sources: Counter[str] = field(default_factory=Counter)  # tokens per ``meta.source`` (if present)

    def merge(self, other: ShardStats) -> None:
        self.docs += other.docs
        self.tokens += other.tokens
        self.empty_docs += other.empty_docs
        self.non_round_trip_docs += other.non_round_trip_docs
        self.bad_records += other.bad_records
        self.special_text_docs += other.special_text_docs
        self.sources.update(other.sources)

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "tokens": self.tokens,
            "empty_docs": self.empty_docs,
            "non_round_trip_docs": self.non_round_trip_docs,
            "bad_records": self.bad_records,
            "special_text_docs": self.special_text_docs,
            "sources": dict(sorted(self.sources.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardStats:
        return cls(
            docs=data["docs"],
            tokens=data["tokens"],
            empty_docs=data["empty_docs"],
            non_round_trip_docs=data["non_round_trip_docs"],
            bad_records=data["bad_records"],
            special_text_docs=data.get("special_text_docs", 0),
            sources=Counter(data.get("sources", {})),
        )


class ShardWriter:
    """Streams documents into one shard: tokens go to ``NAME.bin.tmp`` as they come; :meth:`close` renames
    it, writes the index, then the ``.json`` record that marks the shard complete. An unfinished shard
    (killed writer) leaves only ``.tmp`` files, which the next attempt overwrites."""

    def __init__(self, folder: str | Path, name: str, dtype: np.dtype) -> None:
        self.folder = Path(folder)
        self.name = name
        self.dtype = np.dtype(dtype)
        self._bin_tmp = self.folder / f"{name}.bin.tmp"
        self._file = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._lengths: list[int] = []

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens (EOS included)."""
        self.extend(np.asarray(tokens), [len(tokens)])

    def extend(self, tokens: np.ndarray, lengths: list[int]) -> None:
        """Append several documents at once: their tokens back to back and each one's length."""
        if sum(lengths) != len(tokens):
            raise ValueError(f"document lengths sum to {sum(lengths)}, but {len(tokens)} tokens were given")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(lengths)

    def close(self, stats: ShardStats, info: dict[str, Any] | None = None) -> dict[str, Any]:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._bin_tmp, self.folder / f"{self.name}.bin")
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        tmp_idx = self.folder / f"{self.name}.idx.npy.tmp"
        with open(tmp_idx, "wb") as f:
            np.save(f, offsets)
        os.replace(tmp_idx, self.folder / f"{self.name}.idx.npy")
        record = {"name": self.name, **(info or {}), **stats.to_dict()}
        atomic_write_json(self.folder / f"{self.name}.json", record)
        return record

    def abort(self) -> None:
        self._file.close()
        self._bin_tmp.unlink(missing_ok=True)


def write_shard(
    folder: str | Path,
    name: str,
    documents: list[np.ndarray],
    dtype: np.dtype,
    stats: ShardStats,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a whole shard from per-document token arrays (EOS already appended)."""
    writer = ShardWriter(folder, name, dtype)
    for doc in documents:
        writer.add(doc)
    return writer.close(stats, info)


def read_shard_record(folder: str | Path, name: str) -> dict[str, Any] | None:
    """The completion record of a shard, or None if the shard is missing or unfinished."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def build_manifest(
    shard_records: list[dict[str, Any]],
    dtype: np.dtype,
    vocab_size: int,
    eos_id: int,
    tokenizer_sha256: str,
    **extra: Any,
) -> dict[str, Any]:
    """The folder manifest: shard list plus totals per domain and per source."""
    domains: dict[str, ShardStats] = {}
    total = ShardStats()
    for record in shard_records:
        stats = ShardStats.from_dict(record)
        domains.setdefault(record["domain"], ShardStats()).merge(stats)
        total.merge(stats)
    return {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tokenizer_sha256,
        **extra,
        "totals": {k: v for k, v in total.to_dict().items() if k != "sources"},
        "domains": {
            d: {k: v for k, v in s.to_dict().items() if k != "sources"} for d, s in sorted(domains.items())
        },
        "sources": dict(sorted(total.sources.items())),
        "shards": [
            {
                k: record[k]
                for k in ("name", "domain", "docs", "tokens", *(("input",) if "input" in record else ()))
            }
            for record in shard_records
        ],
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ShardsError(
            f"{folder}: no {MANIFEST_NAME} (not a shards folder, or `lmforge shards tokenize` unfinished)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ShardsError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def check_tokenizer_hash(manifest: dict[str, Any], tokenizer_sha256: str, where: str = "shards") -> None:
    """Refuse shards tokenized by another tokenizer: their ids would mean other tokens."""
    expected = manifest.get("tokenizer_sha256")
    if expected != tokenizer_sha256:
        raise ShardsError(
            f"{where}: tokenized with tokenizer sha256 {expected}, but the tokenizer in use has {tokenizer_sha256}; "
            "re-tokenize the documents or use the tokenizer the shards were made with"
        )


class TokenShards:
    """Memory-mapped read access to the documents of one or more shards folders, grouped by domain.

    Documents of a domain are numbered 0..n-1 across all its shards (folder order, then shard order).
    """

    def __init__(
        self, folders: str | Path | list[str] | list[Path], tokenizer_sha256: str | None = None
    ) -> None:
        if isinstance(folders, str | Path):
            folders = [folders]
        if not folders:
            raise ShardsError("no shards folder given")
        self.manifests = [read_manifest(f) for f in folders]
        hashes = {m["tokenizer_sha256"] for m in self.manifests}
        if len(hashes) > 1:
            raise ShardsError(f"shards folders {folders} were made with different tokenizers")
        if tokenizer_sha256 is not None:
            for folder, manifest in zip(folders, self.manifests):
                check_tokenizer_hash(manifest, tokenizer_sha256, str(folder))
        self.tokenizer_sha256: str = hashes.pop()
        self.vocab_size = max(m["vocab_size"] for m in self.manifests)
        self.eos_id: int = self.manifests[0]["eos_id"]
        self._arrays: list[np.ndarray] = []
        pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
        for folder, manifest in zip(folders, self.manifests):
            dtype = np.dtype(manifest["dtype"])
            for shard in manifest["shards"]:
                base = Path(folder) / shard["name"]
                offsets = np.load(f"{base}.idx.npy")
                size = (Path(f"{base}.bin").stat().st_size) // dtype.itemsize
                if size != offsets[-1]:
                    raise ShardsError(f"{base}.bin has {size} tokens but its index says {offsets[-1]}")
                if size == 0:
                    continue
                self._arrays.append(np.memmap(f"{base}.bin", dtype=dtype, mode="r", shape=(size,)))
                pieces.setdefault(shard["domain"], []).append((len(self._arrays) - 1, offsets))
        self.domains: list[str] = sorted(pieces)
        # Per domain: for each document, the shard array it lives in, its start, and its length.
        self._doc_array: dict[str, np.ndarray] = {}
        self._doc_start: dict[str, np.ndarray] = {}
        self._doc_length: dict[str, np.ndarray] = {}
        for domain, shard_offsets in pieces.items():
            self._doc_array[domain] = np.concatenate(
                [np.full(len(off) - 1, i, dtype=np.int32) for i, off in shard_offsets]
            )
            self._doc_start[domain] = np.concatenate([off[:-1] for _, off in shard_offsets])
            self._doc_length[domain] = np.concatenate([np.diff(off) for _, off in shard_offsets])

    def num_docs(self, domain: str) -> int:
        return len(self._doc_length[domain])

    def doc_lengths(self, domain: str) -> np.ndarray:
        return self._doc_length[domain]

    def num_tokens(self, domain: str) -> int:
        return int(self._doc_length[domain].sum())

    def read(self, domain: str, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``start:stop`` of document ``doc`` of ``domain`` (a view into the memory map)."""
        array = self._arrays[self._doc_array[domain][doc]]
        begin = int(self._doc_start[domain][doc])
        length = int(self._doc_length[domain][doc])
        stop = length if stop is None else min(stop, length)
        return array[begin + start : begin + stop]
